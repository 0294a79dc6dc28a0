"""AlphaEdit (Fang et al., ICLR 2025): updates in the null space of the preserved keys.

``P = Û Ûᵀ`` projects onto the span of ``C0``'s eigenvectors whose eigenvalues are
below ``nullspace_threshold`` — directions ordinary text hardly uses — so
``ΔW P`` leaves the outputs of preserved keys (almost) untouched by construction.
With the run's edit memory ``S`` (docs/math.md)

``(P (S + K_E K_Eᵀ) + ρ I) X = P K_E Rᵀ``,  ``ΔW = Xᵀ``

so ``U = R`` and ``V = (P (S + K_E K_Eᵀ) + ρ I)⁻¹ P K_E``. The system is not
symmetric (``P`` multiplies from the left only), so it is solved by LU.
``C0``'s weight λ plays no part: the projection replaces it.
"""

from __future__ import annotations

import torch

from editing.config import ObjectiveParams
from editing.delta import LowRankDelta
from editing.objectives.base import EditProblem, Objective


def alphaedit_update(basis: torch.Tensor, memory: torch.Tensor | None, k_e: torch.Tensor, residual: torch.Tensor,
                     ridge: float) -> LowRankDelta:
    """``ΔW = R ((P (S + K_E K_Eᵀ) + ρ I)⁻¹ P K_E)ᵀ`` with ``P = Û Ûᵀ``: ``U = R``, ``V`` the solve (d_in×B)."""
    projected_keys = basis @ (basis.T @ k_e)                                           # P K_E    (d_in, B)
    moment = k_e @ k_e.T if memory is None else memory + k_e @ k_e.T                  # S + K_E K_Eᵀ  (d_in, d_in)
    identity = torch.eye(k_e.shape[0], dtype=k_e.dtype, device=k_e.device)
    system = basis @ (basis.T @ moment) + ridge * identity                             # P (S + K_E K_Eᵀ) + ρ I
    return LowRankDelta(u=residual, v=torch.linalg.solve(system, projected_keys))


class AlphaEdit(Objective):
    name = "alphaedit"
    needs_null_space = True

    def uses_edit_memory(self, params: ObjectiveParams) -> bool:
        return True

    def update(self, problem: EditProblem, params: ObjectiveParams) -> LowRankDelta:
        if problem.null_space is None:
            raise ValueError("alphaedit needs the null-space basis of C0 (editing.stats.null_space_bases)")
        return alphaedit_update(problem.null_space.to(problem.k_e), problem.edit_memory, problem.k_e,
                                problem.residual, params.alphaedit_ridge)
