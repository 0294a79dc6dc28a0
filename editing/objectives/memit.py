"""MEMIT: least-squares memorization of a batch, and ENCORE, MEMIT preserving the run's earlier edits.

``min λ‖Ŵ K0 − W0 K0‖² + ‖Ŵ K_E − V_E‖²``  ⇒  ``ΔW = R K_Eᵀ (λ C0 + μ I + K_E K_Eᵀ)⁻¹``

so ``U = R`` and ``V = (λ C0 + μ I + K_E K_Eᵀ)⁻¹ K_E`` (the matrix is symmetric).

ENCORE (Gupta et al., 2025) adds the keys of every earlier edit of the run to
the preserved set and a norm penalty μ = λ_n (MATH.md):
``ΔW = R K_Eᵀ (λ C0 + S + K_E K_Eᵀ + λ_n I)⁻¹`` — MEMIT with the edit memory
always on; its other half, most-probable early stopping of v*, is
``values.mpes_extra_steps``.
"""

from __future__ import annotations

import torch

from editing.config import ObjectiveParams
from editing.delta import LowRankDelta
from editing.objectives.base import EditProblem, Objective, cholesky


class Memit(Objective):
    name = "memit"

    def update(self, problem: EditProblem, params: ObjectiveParams) -> LowRankDelta:
        k_e = problem.k_e
        a = problem.preservation(params, self.uses_edit_memory(params)) + k_e @ k_e.T
        v = torch.cholesky_solve(k_e, cholesky(a, "λ C0 + μ I (+ S) + K_E K_Eᵀ"))
        return LowRankDelta(u=problem.residual, v=v)


class Encore(Memit):
    name = "encore"

    def uses_edit_memory(self, params: ObjectiveParams) -> bool:
        return True
