"""Model adapters and loading (GPT-2, GPT-J and Llama families; GGUF, local folders, hub names)."""

from editing.models.adapter import ARCHITECTURES, ArchitectureSpec, ModelAdapter
from editing.models.loading import DEFAULT_MODEL, cache_dir, load_model

__all__ = ["ARCHITECTURES", "ArchitectureSpec", "ModelAdapter", "DEFAULT_MODEL", "cache_dir", "load_model"]
