"""LyapLock (caskcsg/LyapLock; read in wpwpwpyo/LyapLock ``lyaplock/lyaplock_main.py``, ``execute_lyaplock``).

Each batch minimises, for a layer at its current weight ``W``,

``‖(W + Δ) K − (W K + R)‖² + Σ_p ‖(W + Δ) K_p − V_p‖² + q w · D(W + Δ)``

— the new edit, the earlier edits' values as they were written (``V_p = W_p K_p``) and the preservation
loss ``D`` (``editing.lyapunov``) weighted by the virtual queue ``q`` times ``w = mom2_update_weight``.
Setting its gradient to zero:

``ΔW = [R Kᵀ + (Σ_p V_p K_pᵀ − W S) + q w (W0 − W) C0] (K Kᵀ + S + q w C0)⁻¹``,  ``S = Σ_p K_p K_pᵀ``.

On the first batch (``S = 0``, ``W = W0``, ``q = 1``) this is MEMIT with λ = w. The drift and anchor terms
are full matrices, so the update is dense (a :class:`~editing.delta.DenseDelta`). The authors' ``V = 1``
(the weight of the edit terms) is fixed here.
"""

from __future__ import annotations

import torch

from editing.config import ObjectiveParams
from editing.delta import DenseDelta
from editing.objectives.base import EditProblem, Objective, cholesky


class LyapLock(Objective):
    name = "lyaplock"
    needs_lyapunov = True

    def uses_edit_memory(self, params: ObjectiveParams) -> bool:
        return True

    def update(self, problem: EditProblem, params: ObjectiveParams) -> DenseDelta:
        terms = problem.lyapunov
        if terms is None:
            raise ValueError("lyaplock needs its queue's terms (editing.lyapunov.LyapunovQueue)")
        k, s = problem.k_e, problem.edit_memory
        system = k @ k.T + terms.weight * problem.c0 + (0 if s is None else s)                    # (d_in, d_in)
        right = problem.residual @ k.T + terms.drift.to(k) + terms.weight * terms.anchor.to(k)     # (d_out, d_in)
        delta = torch.cholesky_solve(right.T, cholesky(system, "K Kᵀ + S + q w C0")).T
        return DenseDelta(delta.float())
