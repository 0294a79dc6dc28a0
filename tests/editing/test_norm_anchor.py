"""NAS: the rescaling rule and the anchor, against the rule computed directly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from editing.config import ValueParams
from editing.facts import fact_from_record
from editing.norm_anchor import CAP, anchor_norm, rescale, trimmed_mean
from editing.tracing import read_states
from editing.v_star import compute_v_star, mlp_output_at_subject
from fixtures.data import counterfact_records

PARAMS = ValueParams(steps=3, n_prefixes=0, norm_anchor_scaling=True, nas_anchor_facts=20)


def test_targets_are_scaled_to_the_anchor_norm_and_dropped_above_twice_it():
    generator = torch.Generator().manual_seed(0)
    v0 = torch.randn(6, 8, generator=generator)
    delta = torch.randn(6, 8, generator=generator) * torch.tensor([0.1, 0.5, 1, 2, 4, 8])[:, None]
    anchor = float((v0 + delta).norm(dim=1).median())
    scaled, dropped = rescale(delta, v0, anchor)
    for i in range(6):
        v_star = v0[i] + delta[i]
        if v_star.norm() > CAP * anchor:
            assert dropped[i] and torch.equal(scaled[i], torch.zeros(8))
        else:
            assert not dropped[i]
            torch.testing.assert_close((v0[i] + scaled[i]).norm(), torch.tensor(anchor))
            torch.testing.assert_close(torch.nn.functional.cosine_similarity(v0[i] + scaled[i], v_star, dim=0),
                                       torch.tensor(1.0))
    assert 0 < int(dropped.sum()) < 6


def test_the_anchor_leaves_out_the_largest_five_percent():
    norms = torch.arange(1.0, 41.0)  # 40 norms: floor(0.05 · 40) = 2 left out
    assert trimmed_mean(norms) == pytest.approx(sum(range(1, 39)) / 38)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_anchor_is_the_trimmed_mean_of_unedited_v_star_norms_whatever_the_model_holds(tiny_model, fresh_cache):
    adapter = tiny_model("llama", n_layers=4)
    facts = [fact_from_record(record) for record in counterfact_records(0, 20)]
    plain = replace(PARAMS, norm_anchor_scaling=False)
    v0 = read_states(adapter, *_bare(adapter, facts), mlp_output_layers=[2]).mlp_outputs[2]
    expected = trimmed_mean((v0 + compute_v_star(adapter, facts, 2, ("",), plain).delta).norm(dim=1))
    anchor = anchor_norm(adapter, 2, PARAMS)
    assert anchor == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        adapter.weight(2).mul_(3.0)  # an edited model: the anchor is still the unedited model's
    for cached in list(fresh_cache.rglob("*.json")):
        cached.unlink()
    assert anchor_norm(adapter, 2, PARAMS) == pytest.approx(anchor, rel=1e-5)


def test_v_star_with_nas_hands_the_solve_targets_of_the_anchor_norm(tiny_model, fresh_cache):
    adapter = tiny_model("llama", n_layers=4)
    facts = [fact_from_record(record) for record in counterfact_records(30, 34)]
    anchor = anchor_norm(adapter, 2, PARAMS)
    result = compute_v_star(adapter, facts, 2, ("",), PARAMS, anchor=anchor)
    v0 = mlp_output_at_subject(adapter, facts, 2)
    kept = ~result.dropped
    assert kept.any()
    torch.testing.assert_close((v0 + result.delta)[kept].norm(dim=1), torch.full((int(kept.sum()),), anchor),
                               rtol=1e-4, atol=1e-4)
    none_kept = compute_v_star(adapter, facts, 2, ("",), PARAMS, anchor=1e-6)
    assert none_kept.dropped.all() and torch.equal(none_kept.delta, torch.zeros_like(none_kept.delta))
    with pytest.raises(ValueError, match="norm_anchor_scaling needs the anchor"):
        compute_v_star(adapter, facts, 2, ("",), PARAMS)


def _bare(adapter, facts):
    from editing.rows import build_v_star_rows

    rows = build_v_star_rows(adapter, facts, ("",), "{} is a")
    return rows.batch.rows(rows.bare_rows), rows.subject_position[rows.bare_rows]
