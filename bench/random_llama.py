"""A random-weight Llama of a chosen size, written as a Hugging Face folder (SmolLM2's tokenizer), for measuring
memory and time where they scale without downloading a large model.

    python bench/random_llama.py --out out/random-llama-1b                 # ~1.1 B parameters
    python bench/random_llama.py --out out/x --hidden 4096 --layers 32 --intermediate 14336   # Llama-3-8B's shape

The default shape is a Llama-3.2-1B-like one (hidden 2048, 16 layers, MLP 8192, 32 heads, 8 KV heads) with
SmolLM2's 49,152-token vocabulary. Weights are random (``initializer_range`` 0.02): facts are not known, so
quality numbers mean nothing; memory and seconds per step do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from editing.models import load_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    tokenizer = load_model(device="cpu").tokenizer
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    count = sum(parameter.numel() for parameter in model.parameters())
    print(f"{args.out}: random Llama, {count / 1e9:.2f} B parameters, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
