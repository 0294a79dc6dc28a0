"""LyapLock: its solve against the stacked least squares it minimises, its queue against the authors' recursion."""

from __future__ import annotations

import math

import torch

from editing.config import ObjectiveParams
from editing.lyapunov import LyapunovQueue, preservation_loss
from editing.objectives import solve

D_IN, D_OUT = 16, 8


def _spd(generator, d):
    a = torch.randn(d, 3 * d, generator=generator, dtype=torch.float64)
    return a @ a.T / a.shape[1] + 0.05 * torch.eye(d, dtype=torch.float64)


def test_the_update_minimises_edit_earlier_edits_and_weighted_preservation_loss():
    """After two batches, the third batch's ΔW equals the least-squares solution, written as one stacked
    problem, of ‖ΔK − R‖² + Σ_p ‖(W + Δ)K_p − V_p‖² + q w ‖(W + Δ − W0) C0^½‖²."""
    g = torch.Generator().manual_seed(0)
    c0, w0 = _spd(g, D_IN), torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    params = ObjectiveParams(mom2_update_weight=2.0, lyaplock_alpha=1.5)
    queue = LyapunovQueue(params.lyaplock_alpha, {0: w0}, {0: c0})
    w, memory, history = w0.clone(), None, []
    for batch in range(3):
        k = torch.randn(D_IN, 3, generator=g, dtype=torch.float64)
        r = torch.randn(D_OUT, 3, generator=g, dtype=torch.float64)
        terms = queue.terms(0, w, memory, params.mom2_update_weight)
        delta = solve("lyaplock", c0, k, r, params, edit_memory=memory, lyapunov=terms).dense()
        root = torch.linalg.cholesky(c0)                                         # C0 = L Lᵀ
        keys = torch.cat([k, *[kp for kp, _ in history], math.sqrt(terms.weight) * root], dim=1)
        targets = torch.cat([r, *[vp - w @ kp for kp, vp in history],
                             math.sqrt(terms.weight) * (w0 - w) @ root], dim=1)
        expected = torch.linalg.lstsq(keys.T, targets.T).solution.T
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5)     # the update is rounded to float32
        w = w + delta
        history.append((k, w @ k))
        memory = k @ k.T if memory is None else memory + k @ k.T
        queue.add({0: w}, {0: k})


def test_the_queue_follows_the_authors_unnormalised_recursion():
    """Z0 = √(αD_base), a = 1/√(αD_base), Z ← max(Z + a(D − αD_base), √(αD_base)); the weight is a·Z."""
    g = torch.Generator().manual_seed(1)
    c0, w0 = _spd(g, D_IN), torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    alpha = 2.0
    queue = LyapunovQueue(alpha, {0: w0}, {0: c0})
    w, z, a, floor, d_base = w0.clone(), None, None, None, None
    for scale in (0.1, 0.5, 1.0, 2.0):
        w = w + scale * torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
        k = torch.randn(D_IN, 2, generator=g, dtype=torch.float64)
        queue.add({0: w}, {0: k})
        loss = float(((w - w0) @ c0 * (w - w0)).sum())
        assert preservation_loss(w, w0, c0) == torch.tensor(loss).item() or abs(preservation_loss(w, w0, c0) - loss) < 1e-9
        if d_base is None:
            d_base = loss
            z, a, floor = math.sqrt(alpha * d_base), 1 / math.sqrt(alpha * d_base), math.sqrt(alpha * d_base)
        z = max(z + a * (loss - alpha * d_base), floor)
        assert abs(queue.q[0] - a * z) < 1e-9
    assert queue.q[0] > 1  # the loss outgrew its budget, so preservation weighs more
