"""Today's model families, each on a tiny random model built locally with its real transformers class and
module names: the edited matrix maps the key to the module's output, an exact edit lands (the model's own
hidden state at the last subject token becomes the target ``z``), and the edited model written out loads
in plain transformers with the same logits. (The v* engine against full-model passes, per family:
``tests/editing/test_v_star_reference.py``.)"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from editing.config import EditConfig, ObjectiveParams, StatsParams, ValueParams
from editing.editor import Editor
from editing.facts import fact_from_record
from editing.stats import second_moments
from fixtures.data import counterfact_records
from fixtures.models import FAMILIES

NEW_FAMILIES = [family for family in FAMILIES if family not in ("gpt2", "gptj", "llama")]
LAYERS = (1, 2)


@pytest.fixture(scope="module")
def facts():
    return [fact_from_record(record, index) for index, record in enumerate(counterfact_records(10, 13), start=10)]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_edited_matrix_maps_the_key_to_the_modules_output(tiny_model, family):
    adapter = tiny_model(family)
    weight = adapter.weight(1)
    assert weight.shape == (adapter.hidden_dim, adapter.key_dim) == (64, 128)
    captured = {}
    module = adapter.edited_module(1)
    handle = module.register_forward_hook(lambda m, args, out: captured.update(key=args[0], value=out))
    with torch.no_grad():
        adapter.model(torch.tensor([[5, 17, 300, 42, 7, 9]]))
    handle.remove()
    bias = getattr(module, "bias", None)
    expected = captured["key"] @ weight.T + (bias if bias is not None else 0)
    torch.testing.assert_close(captured["value"], expected, rtol=1e-5, atol=1e-5)


def _block_output_at_subjects(adapter, facts, layer: int) -> torch.Tensor:
    """Block ``layer``'s output at the last subject token of each fact's bare prompt, from the model's own
    ``hidden_states`` (position found from the tokenizer's offsets)."""
    tokenizer, rows = adapter.tokenizer, []
    for fact in facts:
        encoding = tokenizer(fact.rewrite_prompt, return_offsets_mapping=True)
        end = fact.subject_span[1]
        position = next(i for i, (a, b) in enumerate(encoding["offset_mapping"]) if a < end <= b)
        with torch.no_grad():
            hidden = adapter.model(torch.tensor([encoding["input_ids"]]), output_hidden_states=True).hidden_states
        rows.append(hidden[layer + 1][0, position])  # hidden_states[l + 1] is block l's output
    return torch.stack(rows)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_an_exact_edit_lands_and_the_written_model_loads_in_plain_transformers(tiny_model, facts, family, tmp_path):
    """Exact EMMET spread over two layers: afterwards block 2's output at the last subject token of each bare
    prompt is the fact's target ``z`` — except on Gemma-2, whose MLP output passes through an RMSNorm
    (``post_feedforward_layernorm``) before it joins the residual stream: an RMSNorm's output has a fixed
    scale, so a residual change ``R`` is reachable only in direction, and the edit lands approximately (it is
    exact in the down projection's own output, memorization 1)."""
    adapter = tiny_model(family)
    moments = second_moments(adapter, list(LAYERS), StatsParams(corpus="wikitext-2-valid", n_samples=48,
                                                                max_tokens=64), progress=False)
    config = EditConfig(algorithm="emmet", layers=LAYERS, distribution="memit_spread",
                        objective=ObjectiveParams(mom2_update_weight=1.0, emmet_lambda=0.0),
                        values=ValueParams(lr=0.5, steps=6, loss_threshold=0.0, n_prefixes=0))
    before = _block_output_at_subjects(adapter, facts, LAYERS[-1])
    edit = Editor(adapter, config, moments, ("",)).apply(facts)
    assert torch.all(edit.v_star.final_nll < edit.v_star.initial_nll)
    after = _block_output_at_subjects(adapter, facts, LAYERS[-1])
    z = edit.v_star.z
    error = torch.linalg.norm(after - z, dim=1) / torch.linalg.norm(z, dim=1)
    if family == "gemma2":
        assert torch.all(error < 0.5 * torch.linalg.norm(before - z, dim=1) / torch.linalg.norm(z, dim=1)), error
    else:
        assert torch.all(error < 1e-4), (family, error)
    assert all(update.memorization == pytest.approx(1.0, abs=1e-5) for update in edit.updates)

    tokenizer = adapter.tokenizer
    adapter.model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(loaded) is type(adapter.model)
    ids = torch.tensor([tokenizer(facts[0].rewrite_prompt)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, adapter.model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gemma2"])
def test_the_lm_head_applied_alone_includes_gemma2s_soft_capping(tiny_model, family):
    """Scoring and v* apply the head to hidden states themselves; Gemma-2's cap must come with it."""
    adapter = tiny_model(family)
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        full = adapter.model(ids).logits
        hidden = adapter.model.base_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(adapter.logits(hidden), full)
        assert not torch.allclose(adapter.model.get_output_embeddings()(hidden), full)
