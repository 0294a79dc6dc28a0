"""Context prefixes: short texts the model writes itself, put before each edit prompt.

k* is the mean key over prompts with these prefixes and v* is optimised over
all of them, so the edit holds in varied contexts rather than only right after
the start of a text. They are generated once (seeded) and then treated as part
of a run's configuration: replaying or resuming a run must not regenerate them.
"""

from __future__ import annotations

import torch

from editing.models.adapter import ModelAdapter

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You", "However", "In", "It", "When", "This")


def clean_prefix(text: str) -> str:
    """One line, no template braces, ending with '. ' so the prompt starts a new sentence."""
    text = " ".join(text.replace("{", " ").replace("}", " ").split())
    return text.rstrip(" .") + ". "


@torch.no_grad()
def generate_prefixes(adapter: ModelAdapter, n_prefixes: int, n_tokens: int, seed: int = 0) -> tuple[str, ...]:
    """The empty prefix followed by ``n_prefixes`` sampled continuations of stock sentence starts.

    Sampling is top-5 under a fixed seed, like ROME's context templates; the
    generator state of the caller is left untouched.
    """
    if n_prefixes == 0:
        return ("",)
    starts = [PREFIX_STARTS[i % len(PREFIX_STARTS)] for i in range(n_prefixes)]
    tokenizer = adapter.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(starts, return_tensors="pt", padding=True).to(adapter.device)
    finally:
        tokenizer.padding_side = side
    devices = [adapter.device] if adapter.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        output = adapter.model.generate(**batch, do_sample=True, top_k=5, max_new_tokens=n_tokens,
                                        pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(output, skip_special_tokens=True)
    return ("", *(clean_prefix(text) for text in texts))
