"""PRUNE's restraint against its closed form, built densely here: a change ``ΔW = Q_u diag(s) Q_vᵀ`` with chosen
singular values, some above ``σ_max = ‖W0‖₂``, must come back as ``W0 + Q_u diag(F(s)) Q_vᵀ`` with
``F(σ) = ln σ − ln σ_max + σ_max`` above ``σ_max`` and ``σ`` below; and the delivered model is restrained only
for as long as it is delivered."""

from __future__ import annotations

import math

import torch

from editing.prune import restrain, restrained_model
from fixtures.models import build_tiny_model


def test_restrain_maps_each_singular_value_of_the_change_through_f():
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 20, generator=generator, dtype=torch.float64)
    sigma_max = float(torch.linalg.matrix_norm(w0, ord=2))
    q_u, _ = torch.linalg.qr(torch.randn(12, 4, generator=generator, dtype=torch.float64))
    q_v, _ = torch.linalg.qr(torch.randn(20, 4, generator=generator, dtype=torch.float64))
    s = torch.tensor([5.0 * sigma_max, 2.0 * sigma_max, 0.5 * sigma_max, 0.1 * sigma_max], dtype=torch.float64)
    expected_s = torch.tensor([math.log(v) - math.log(sigma_max) + sigma_max if v >= sigma_max else v
                               for v in s.tolist()], dtype=torch.float64)
    edited = w0 + q_u @ torch.diag(s) @ q_v.T
    expected = w0 + q_u @ torch.diag(expected_s) @ q_v.T
    torch.testing.assert_close(restrain(w0, edited), expected, rtol=0, atol=1e-10)
    # the singular values above σ_max are pulled to within a logarithm of it; those below are untouched
    got = torch.linalg.svdvals(restrain(w0, edited) - w0)
    torch.testing.assert_close(got[:4], expected_s.sort(descending=True).values, rtol=0, atol=1e-10)
    assert float(got[4:].abs().max()) < 1e-10  # and the change stays rank 4


def test_the_restrained_model_is_delivered_and_then_put_back_exactly(tokenizer):
    adapter = build_tiny_model("llama", tokenizer, hidden=64)
    original = adapter.weight(1).detach().clone()
    with torch.no_grad():
        adapter.weight(1).add_(10 * torch.outer(torch.ones(64), torch.ones(128)))  # one huge singular value
    edited = adapter.weight(1).detach().clone()
    with restrained_model(adapter, {1: original}, [1]):
        inside = adapter.weight(1).detach().clone()
        assert float(torch.linalg.matrix_norm(inside.double() - original.double(), ord=2)) < \
            float(torch.linalg.matrix_norm(edited.double() - original.double(), ord=2)) / 2
    assert torch.equal(adapter.weight(1), edited)
