"""MEMIT (Meng et al., 2023): least-squares memorization of a batch.

``min λ‖Ŵ K0 − W0 K0‖² + ‖Ŵ K_E − V_E‖²``  ⇒  ``ΔW = R K_Eᵀ (C + K_E K_Eᵀ)⁻¹``

with ``C = λ C0 + μ I`` (``+ S`` with ``preserve_edits``); the matrix is symmetric, so
``U = R`` and ``V = (C + K_E K_Eᵀ)⁻¹ K_E``. ENCORE is this objective with the edit
memory always preserved (:mod:`editing.objectives.encore`).
"""

from __future__ import annotations

import torch

from editing.config import ObjectiveParams
from editing.delta import LowRankDelta
from editing.objectives.base import EditProblem, Objective, cholesky


def memit_update(c: torch.Tensor, k_e: torch.Tensor, residual: torch.Tensor) -> LowRankDelta:
    """``ΔW = R K_Eᵀ (C + K_E K_Eᵀ)⁻¹`` as ``U = R`` (d_out×B), ``V = (C + K_E K_Eᵀ)⁻¹ K_E`` (d_in×B)."""
    system = c + k_e @ k_e.T                                                           # (d_in, d_in)
    return LowRankDelta(u=residual, v=torch.cholesky_solve(k_e, cholesky(system, "λ C0 + μ I (+ S) + K_E K_Eᵀ")))


class Memit(Objective):
    name = "memit"

    def update(self, problem: EditProblem, params: ObjectiveParams) -> LowRankDelta:
        return memit_update(problem.preservation(params, self.uses_edit_memory(params)), problem.k_e,
                            problem.residual)
