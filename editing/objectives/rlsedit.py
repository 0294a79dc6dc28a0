"""RLSEdit: sequential editing as recursive least squares (Euphoria040201/RLSEdit ``RLSEdit/RLSEdit_main.py``).

Over the whole sequence of batches ``t = 1..T`` it minimises

``‖W − W0‖²_{A0} + Σ_t ‖W K_t − V_t‖²``,  ``A0 = λ C0 + μ I``

(the authors' ``μ² w C0 + λ² I``: ``mom2_update_weight`` = μ² w, ``update_norm_lambda`` = λ²), and
reaches its minimiser batch by batch with the recursive least-squares step: with the running inverse
``P_{t−1} = (A0 + Σ_{s<t} K_s K_sᵀ)⁻¹`` and the residual ``R_t = V_t − W_{t−1} K_t``,

``ΔW_t = R_t (P_t K_t)ᵀ``,  ``P_t K_t = P_{t−1} K_t (I + K_tᵀ P_{t−1} K_t)⁻¹``  (Woodbury),

so a batch costs ``O(d² B)`` and never refactors the d × d system. In exact arithmetic this is MEMIT with
the run's earlier edits preserved (ENCORE's solve without its norm term): RLS is that solve, kept
recursively. ``P`` is run state, kept and rebuilt with the edit memory (:mod:`editing.memory`).

The authors' committed code rebuilds ``P`` from ``A0`` at every batch (its ``cache_c`` is never passed
back for RLSEdit in ``experiments/evaluate.py``), which drops the recursion; this is the method as
its docstring ("按 4.4") states it, with ``P`` carried across batches.
"""

from __future__ import annotations

import torch

from editing.config import ObjectiveParams
from editing.delta import LowRankDelta
from editing.objectives.base import EditProblem, Objective, cholesky


def woodbury_gain(inverse: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(P⁻¹ + K Kᵀ)⁻¹ K = F (I + Kᵀ F)⁻¹`` with ``F = P K``: the new inverse applied to the keys, in
    ``O(d² B)`` — what RLSEdit's update multiplies the residual by."""
    f = inverse @ keys                                                                   # (d_in, B)
    s = torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device) + keys.T @ f      # (B, B)
    return torch.cholesky_solve(f.T, cholesky(s, "I + Kᵀ P K")).T


def woodbury_update(inverse: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(P⁻¹ + K Kᵀ)⁻¹ = P − F (I + Kᵀ F)⁻¹ Fᵀ`` with ``F = P K``, kept exactly symmetric."""
    f = inverse @ keys
    updated = inverse - woodbury_gain(inverse, keys) @ f.T
    return (updated + updated.T) / 2


class RlsEdit(Objective):
    name = "rlsedit"
    needs_running_inverse = True

    def uses_edit_memory(self, params: ObjectiveParams) -> bool:
        return True

    def update(self, problem: EditProblem, params: ObjectiveParams) -> LowRankDelta:
        if problem.running_inverse is None:
            raise ValueError("rlsedit needs the running inverse P (the edit memory keeps it)")
        return LowRankDelta(u=problem.residual, v=woodbury_gain(problem.running_inverse, problem.k_e))
