"""k* and v*: batching changes nothing but speed; the optimisation does what docs/math.md says."""

from __future__ import annotations


import pytest
import torch

from editing.config import ValueParams
from editing.facts import fact_from_record
from editing.keys import compute_keys
from editing.rows import build_rewrite_rows
from editing.v_star import compute_v_star
from editing.tokens import encode_target
from fixtures.data import counterfact_records

PREFIXES = ("", "The weather was cold. ", "Therefore a new plan. ")


@pytest.fixture(scope="module")
def facts():
    return [fact_from_record(record) for record in counterfact_records(0, 4)]


def test_keys_weigh_the_bare_prompt_as_much_as_all_prefixes(tiny_model, facts):
    """MEMIT/UME ``compute_ks``: mean within each context type (bare; prefixed), then over the types."""
    adapter = tiny_model("gpt2")
    rows = build_rewrite_rows(adapter, facts, PREFIXES, with_targets=False)
    keys, current = compute_keys(adapter, rows, 1, len(facts), residual_layer=2)
    assert keys.shape == (len(facts), adapter.key_dim)
    assert current.shape == (len(facts), adapter.hidden_dim)
    for index, fact in enumerate(facts):
        single = build_rewrite_rows(adapter, [fact], PREFIXES, with_targets=False)
        per_prefix = [compute_keys(adapter, build_rewrite_rows(adapter, [fact], (p,), with_targets=False), 1, 1)[0]
                      for p in PREFIXES]
        expected = 0.5 * per_prefix[0][0] + 0.5 * torch.cat(per_prefix[1:]).mean(0)
        torch.testing.assert_close(keys[index], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compute_keys(adapter, single, 1, 1)[0][0], keys[index], rtol=1e-4, atol=1e-5)


def test_rows_put_target_positions_after_the_prompt(tokenizer, tiny_model, facts):
    adapter = tiny_model("llama")
    rows = build_rewrite_rows(adapter, facts[:1], PREFIXES)
    target = encode_target(tokenizer, facts[0].target_new)
    for row in range(len(PREFIXES)):
        length = int(rows.batch.attention_mask[row].sum())
        assert rows.target_positions[row][-1] == length - 1
        assert rows.target_ids[row] == target
        # the tokens after the first target position are the target's own (teacher forcing)
        first = rows.target_positions[row][0]
        assert rows.batch.input_ids[row, first + 1: length].tolist() == target[:-1]


def test_batched_v_star_equals_per_fact_optimisation(tiny_model, facts):
    """Each fact has its own Adam parameter, so sharing forward passes must not change any δ."""
    adapter = tiny_model("llama", n_layers=3)
    params = ValueParams(lr=0.5, steps=6, clamp_norm_factor=2.0, kl_factor=0.0625, weight_decay=0.01,
                         loss_threshold=0.0)
    batched = compute_v_star(adapter, facts, 1, PREFIXES, params, rows_per_chunk=5)
    for index, fact in enumerate(facts):
        alone = compute_v_star(adapter, [fact], 1, PREFIXES, params)
        torch.testing.assert_close(batched.delta[index], alone.delta[0], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(batched.final_nll[index], alone.final_nll[0], rtol=1e-3, atol=1e-4)


def test_v_star_respects_the_clamp_and_lowers_the_loss(tiny_model, facts):
    adapter = tiny_model("gptj", n_layers=3)
    params = ValueParams(lr=1.0, steps=8, clamp_norm_factor=0.5, kl_factor=0.0, weight_decay=0.0, loss_threshold=0.0)
    result = compute_v_star(adapter, facts, 1, PREFIXES, params)
    h = result.z - result.delta
    assert torch.all(result.delta.norm(dim=1) <= 0.5 * h.norm(dim=1) * (1 + 1e-5))
    assert torch.all(result.final_nll < result.initial_nll)
    assert torch.all(result.steps == 8)


def test_converged_facts_stop_early(tiny_model, facts):
    adapter = tiny_model("llama", n_layers=3)
    params = ValueParams(steps=5, loss_threshold=1e9)  # every fact is "converged" at once
    result = compute_v_star(adapter, facts, 1, PREFIXES, params)
    assert torch.all(result.steps == 1)
    assert torch.count_nonzero(result.delta) == 0


def test_model_parameters_keep_their_grad_flags(tiny_model, facts):
    adapter = tiny_model("gpt2", n_layers=2)
    flags = [p.requires_grad for p in adapter.model.parameters()]
    compute_v_star(adapter, facts[:1], 0, ("",), ValueParams(steps=2))
    assert [p.requires_grad for p in adapter.model.parameters()] == flags
    assert all(p.grad is None for p in adapter.model.parameters())


@pytest.mark.smollm
def test_most_probable_early_stopping_stops_a_fact_whose_target_already_leads(smollm2, eiffel_fact):
    """SmolLM2 already continues the Eiffel Tower prompt with " Paris": asked to make Paris the target, MPES
    stops it after 1 + k evaluations, while without MPES it runs every step (the loss threshold is 0)."""
    from dataclasses import replace

    fact = replace(eiffel_fact, target_new="Paris", target_true="Rome")
    base = ValueParams(steps=4, loss_threshold=0.0, n_prefixes=0)
    layer = 6
    without = compute_v_star(smollm2, [fact], layer, ("",), base)
    assert without.stop_reasons == ("steps",) and int(without.steps[0]) == 4
    for extra in (0, 2):
        with_mpes = compute_v_star(smollm2, [fact], layer, ("",), replace(base, mpes_extra_steps=extra))
        assert with_mpes.stop_reasons == ("most_probable",)
        assert int(with_mpes.steps[0]) == 1 + extra
    # a target the model does not predict yet (Rome) is optimised until it leads
    other = compute_v_star(smollm2, [eiffel_fact], layer, ("",), replace(base, mpes_extra_steps=0))
    assert int(other.steps[0]) > 1 and float(other.final_nll[0]) < float(other.initial_nll[0])
