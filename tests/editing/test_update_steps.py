"""RECT against its rule computed by a plain loop, and its dense updates through the editor and the ledger."""

from __future__ import annotations

import pytest
import torch

from db.tensors import delta_from_bytes, delta_to_bytes
from editing.config import EditConfig, ObjectiveParams, ValueParams
from editing.delta import DenseDelta, LowRankDelta, apply_delta, weight_sha256
from editing.editor import Editor
from editing.facts import fact_from_record
from editing.update_steps import rect
from fixtures.data import counterfact_records
from fixtures.plain import random_second_moments


def _rect_by_hand(change: list[list[float]], weight: list[list[float]], keep: float) -> list[list[float]]:
    """The rule as the reimplementation states it, entry by entry: rank the relative changes, take the
    k-th smallest (k = ⌊(1 − keep) n⌋) as the threshold, keep every entry at or above it."""
    ratios = [abs(c / (w + 1e-8)) for row_c, row_w in zip(change, weight) for c, w in zip(row_c, row_w)]
    threshold = sorted(ratios)[max(1, int(len(ratios) * (1 - keep))) - 1]
    return [[c if abs(c / (w + 1e-8)) >= threshold else 0.0 for c, w in zip(row_c, row_w)]
            for row_c, row_w in zip(change, weight)]


@pytest.mark.parametrize("keep", [0.4, 0.2, 1.0])
def test_rect_keeps_the_entries_with_the_largest_relative_change(keep):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 20, generator=generator)
    delta = LowRankDelta(torch.randn(12, 2, generator=generator, dtype=torch.float64),
                         torch.randn(20, 2, generator=generator, dtype=torch.float64))
    filtered = rect(delta, weight, keep)
    expected = _rect_by_hand(delta.dense().tolist(), weight.double().tolist(), keep)
    assert isinstance(filtered, DenseDelta)
    torch.testing.assert_close(filtered.matrix, torch.tensor(expected, dtype=torch.float32))
    n = weight.numel()  # the threshold is itself kept: n − k + 1 entries (no ties among random ratios)
    assert int(torch.count_nonzero(filtered.matrix)) == n - max(1, int(n * (1 - keep))) + 1


def test_a_rect_edit_writes_exactly_its_stored_dense_delta(tiny_model):
    adapter = tiny_model("llama", n_layers=4)
    facts = [fact_from_record(record) for record in counterfact_records(0, 3)]
    config = EditConfig(algorithm="rect", layers=(1, 2), values=ValueParams(steps=3, n_prefixes=0),
                        objective=ObjectiveParams(mom2_update_weight=10.0, rect_keep_fraction=0.4))
    editor = Editor(adapter, config, random_second_moments(adapter.key_dim, (1, 2)), ("",))
    before = {layer: adapter.weight(layer).detach().clone() for layer in (1, 2)}
    edit = editor.apply(facts)
    for update in edit.updates:
        assert isinstance(update.delta, DenseDelta)
        stored = delta_from_bytes(delta_to_bytes(update.delta))
        replayed = before[update.layer].clone()
        apply_delta(replayed, stored)
        assert weight_sha256(replayed) == edit.weights_sha256[update.layer]
        changed = (adapter.weight(update.layer) != before[update.layer]).float().mean()
        assert 0.3 < float(changed) <= 0.41
    assert 0 < edit.memorization[2] < 1  # the filter drops part of what MEMIT would write


def test_a_keep_fraction_outside_0_1_is_refused_by_name():
    with pytest.raises(ValueError, match="objective.rect_keep_fraction"):
        ObjectiveParams(rect_keep_fraction=1.5)
