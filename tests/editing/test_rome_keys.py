"""r-ROME's fix is how seqedit's ROME is written: one key, k*, on both sides of the update."""

from __future__ import annotations

import torch

from editing.config import EditConfig, ValueParams
from editing.editor import Editor
from editing.facts import Fact
from fixtures.plain import random_second_moments

PREFIXES = ("", "The weather was cold. ", "A new book came out. ")
FACT = Fact(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English", target_true="French")


def _key_at_subject(adapter, text: str, subject_end: int, layer: int) -> torch.Tensor:
    """The edited MLP's input at the token holding the subject's last character, by a plain forward pass."""
    encoded = adapter.tokenizer(text, return_offsets_mapping=True)
    position = next(i for i, (start, end) in enumerate(encoded["offset_mapping"]) if start < subject_end <= end)
    captured = {}
    handle = adapter.edited_module(layer).register_forward_pre_hook(
        lambda module, args: captured.setdefault("k", args[0][0, position].detach().float()))
    try:
        with torch.no_grad():
            adapter.model(input_ids=torch.tensor([encoded["input_ids"]]))
    finally:
        handle.remove()
    return captured["k"]


def test_rome_writes_its_residual_for_the_prefix_averaged_key_it_was_solved_with(tiny_model):
    """ROME's code solved with k* in the numerator and the bare prompt's key in the denominator; r-ROME (Gupta
    et al., 2024) uses k* for both. seqedit's ROME is EMMET's closed form for the one key k*: the key it solves
    with is k* (½ the bare prompt's key + ½ the mean over the prefixed prompts, computed here by plain forward
    passes), not the bare key, and the update writes the residual exactly for it (memorization 1)."""
    adapter = tiny_model("llama", n_layers=4)
    config = EditConfig(algorithm="rome", layers=(2,), distribution="single_layer",
                        values=ValueParams(steps=3, n_prefixes=len(PREFIXES) - 1))
    editor = Editor(adapter, config, random_second_moments(adapter.key_dim, (2,)), PREFIXES)
    keys = [_key_at_subject(adapter, prefix + FACT.rewrite_prompt, len(prefix) + FACT.subject_span[1], 2)
            for prefix in PREFIXES]
    k_star = 0.5 * keys[0] + 0.5 * torch.stack(keys[1:]).mean(dim=0)
    update = editor.apply([FACT]).updates[0]
    torch.testing.assert_close(update.keys[:, 0], k_star, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(update.keys[:, 0], keys[0], rtol=1e-3, atol=1e-4)
    assert abs(update.memorization - 1.0) < 1e-6
