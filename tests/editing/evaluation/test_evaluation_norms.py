"""Norms of the edited matrices before and after a known change."""

from __future__ import annotations

import math

import pytest
import torch

from editing.evaluation import layer_norms


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # GPT-2 stores the matrix transposed
def test_delta_norm_is_zero_before_and_known_after_adding_a_matrix(tiny_model, family):
    adapter = tiny_model(family)
    layers = [1, 2]
    original = adapter.snapshot(layers)
    before = layer_norms(adapter, original)
    assert all(norms.delta == 0.0 for norms in before.values())
    assert before[1].weight == pytest.approx(float(torch.linalg.matrix_norm(original[1].double())))

    d_out, d_in = adapter.weight(2).shape
    change = torch.zeros(d_out, d_in)
    change[0, :] = 0.5  # ‖change‖_F = 0.5·√d_in
    with torch.no_grad():
        adapter.weight(2).add_(change)
    after = layer_norms(adapter, original)
    assert after[1].delta == 0.0
    assert after[2].delta == pytest.approx(0.5 * math.sqrt(d_in), rel=1e-5)
    assert after[2].weight == pytest.approx(float(torch.linalg.matrix_norm(original[2].double() + change.double())),
                                            rel=1e-6)


def test_wrong_original_shape_is_rejected(tiny_model):
    adapter = tiny_model("llama")
    with pytest.raises(ValueError, match="shape"):
        layer_norms(adapter, {0: adapter.weight(0).T.clone()})
