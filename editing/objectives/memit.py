"""MEMIT: least-squares memorization of a batch.

``min λ‖Ŵ K0 − W0 K0‖² + ‖Ŵ K_E − V_E‖²``  ⇒  ``ΔW = R K_Eᵀ (λ C0 + μ I + K_E K_Eᵀ)⁻¹``

so ``U = R`` and ``V = (λ C0 + μ I + K_E K_Eᵀ)⁻¹ K_E`` (the matrix is symmetric).
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
        a = problem.preservation(params) + k_e @ k_e.T
        v = torch.cholesky_solve(k_e, cholesky(a, "λ C0 + μ I + K_E K_Eᵀ"))
        return LowRankDelta(u=problem.residual, v=v)
