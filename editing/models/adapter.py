"""Model adapters: where, in each architecture, the edited matrix and the residual stream live.

The editing algorithms are architecture-free: they need the MLP output matrix
``W`` of layer ``l`` in (d_out × d_in) orientation, its input (the *key*), and
the residual stream after block ``l``. An :class:`ArchitectureSpec` names those
modules for one family; :class:`ModelAdapter` wraps a loaded model with them.
Adding a family is adding one spec to :data:`ARCHITECTURES`.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.delta import weight_sha256


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one model family (``{layer}`` is the block index)."""

    family: str
    layers: str
    edited_module: str
    transposed: bool
    """True when the parameter is stored (d_in × d_out), as GPT-2's ``Conv1D`` does."""


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "gpt2": ArchitectureSpec("gpt2", "transformer.h", "mlp.c_proj", transposed=True),
    "gptj": ArchitectureSpec("gptj", "transformer.h", "mlp.fc_out", transposed=False),
    "llama": ArchitectureSpec("llama", "model.layers", "mlp.down_proj", transposed=False),
}
# Families that share Llama's module layout.
for _alias in ("mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma", "gemma2"):
    ARCHITECTURES[_alias] = ARCHITECTURES["llama"]


def block_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states of a block's output (a tensor in transformers 5, a tuple in some families)."""
    return output[0] if isinstance(output, tuple) else output


class ModelAdapter:
    """A causal LM with its tokenizer and the knowledge of where edits go."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 name: str, source_fingerprint: str | None = None) -> None:
        model_type = model.config.model_type
        if model_type not in ARCHITECTURES:
            raise ValueError(f"model type {model_type!r} is not supported; known: {sorted(ARCHITECTURES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.spec = ARCHITECTURES[model_type]
        self._source_fingerprint = source_fingerprint
        self._originals: dict[int, torch.Tensor] = {}
        """The edited matrices as loaded (CPU copies), captured the first time each is handed out."""
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()

    # -- structure -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.spec.layers)

    def block(self, layer: int) -> nn.Module:
        """Transformer block ``layer``; its output is the residual stream after that layer."""
        self._check_layer(layer)
        return self.blocks[layer]

    def edited_module(self, layer: int) -> nn.Module:
        """The MLP output projection of ``layer``: its input is the key, its output the value."""
        return self.block(layer).get_submodule(self.spec.edited_module)

    def weight(self, layer: int) -> torch.Tensor:
        """The edited matrix in canonical (d_out × d_in) orientation, as a view of the parameter.

        In-place updates of the returned tensor change the model. Every edit goes
        through this view, so the first call for a layer is the moment to keep its
        loaded value (see :meth:`original_weights`).
        """
        view = self._canonical(layer)
        if layer not in self._originals:
            self._originals[layer] = view.detach().to("cpu", copy=True)
        return view

    def _canonical(self, layer: int) -> torch.Tensor:
        parameter = self.edited_module(layer).weight
        return parameter.T if self.spec.transposed else parameter

    @property
    def key_dim(self) -> int:
        return self._canonical(0).shape[1]

    @property
    def hidden_dim(self) -> int:
        return self._canonical(0).shape[0]

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < len(self.blocks):
            raise ValueError(f"layer {layer} out of range: {self.name} has {len(self.blocks)} layers (0..{len(self.blocks) - 1})")

    # -- identity --------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """sha256 identifying the model's weights as loaded (before any edit).

        When the loader knows a hash of the source files it is used (free);
        otherwise every parameter is hashed once. Statistics caches are keyed on
        it, so it must change whenever the weights do.
        """
        if self._source_fingerprint is not None:
            return self._source_fingerprint
        digest = hashlib.sha256(self.model.config.to_json_string().encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(weight_sha256(tensor).encode())
        return digest.hexdigest()

    def weights_sha256(self, layers: list[int]) -> dict[int, str]:
        """sha256 of each edited matrix (canonical orientation) for the ledger."""
        return {layer: weight_sha256(self.weight(layer)) for layer in layers}

    def snapshot(self, layers: list[int]) -> dict[int, torch.Tensor]:
        """Copies of the edited matrices, to restore later with :meth:`restore`."""
        return {layer: self.weight(layer).detach().clone() for layer in layers}

    def restore(self, weights: dict[int, torch.Tensor]) -> None:
        """Write snapshot (or ledger-restored) matrices back into the model, exactly."""
        with torch.no_grad():
            for layer, tensor in weights.items():
                self.weight(layer).copy_(tensor.to(self.device))

    # -- the model as loaded ---------------------------------------------------------------
    def touched_layers(self) -> list[int]:
        """Layers whose matrix has been handed out for editing (the only ones that may differ from the load)."""
        return sorted(self._originals)

    def original_weights(self, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """The matrices of ``layers`` as loaded, before any edit (CPU tensors; do not modify them)."""
        for layer in layers:
            self.weight(layer)  # captures the loaded value if this is the first access
        return {layer: self._originals[layer] for layer in layers}

    @contextmanager
    def original_state(self) -> Iterator["ModelAdapter"]:
        """The model as loaded for the duration of the block, whatever edits it holds now.

        Anything defined on *the* model (the preserved-key statistics ``C0``, cached under
        its fingerprint) must be computed inside this block: computed on an edited model it
        would describe that edit's keys and poison every later run of the same model. Only
        matrices this adapter handed out can have been edited, so swapping those back is
        enough; the current values are put back afterwards, exactly.
        """
        current = self.snapshot(self.touched_layers())
        self.restore(self._originals)
        try:
            yield self
        finally:
            self.restore(current)
