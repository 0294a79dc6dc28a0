"""EMMET (and ROME, its one-fact case): equality-constrained memorization.

``min ‖Ŵ K0 − W0 K0‖²  s.t.  Ŵ K_E = V_E``  ⇒  ``ΔW = R D⁻¹ K_Eᵀ C⁻¹``

with ``C = λ C0 + μ I`` and ``D = K_Eᵀ C⁻¹ K_E + λ_E I`` (λ_E only when B > 1:
it stabilises the B × B system, which grows ill-conditioned with B or when two
facts share a key). So ``U = R`` and ``V = C⁻¹ K_E D⁻¹``. When ``D`` cannot be
Cholesky-factorised (e.g. duplicate keys with λ_E = 0) its pseudo-inverse is
used, as in the authors' implementation.

ROME is this objective restricted to B = 1, where ``D`` is the scalar
``k_eᵀ C⁻¹ k_e`` and the update is ROME's rank-one formula.
"""

from __future__ import annotations

import logging

import torch

from editing.config import ObjectiveParams
from editing.delta import LowRankDelta
from editing.objectives.base import EditProblem, Objective, cholesky

log = logging.getLogger(__name__)


class Emmet(Objective):
    name = "emmet"

    def update(self, problem: EditProblem, params: ObjectiveParams) -> LowRankDelta:
        k_e = problem.k_e
        c_inv_k = torch.cholesky_solve(k_e, cholesky(problem.preservation(params), "λ C0 + μ I"))
        d = k_e.T @ c_inv_k
        if problem.batch_size > 1:
            d = d + params.emmet_lambda * torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
        factor, info = torch.linalg.cholesky_ex(d)
        if int(info) == 0:
            d_inv_kt_c_inv = torch.cholesky_solve(c_inv_k.T, factor)
        else:
            log.warning("EMMET: K_Eᵀ C⁻¹ K_E + λ_E I is singular (B=%d); using its pseudo-inverse",
                        problem.batch_size)
            d_inv_kt_c_inv = torch.linalg.pinv(d, hermitian=True) @ c_inv_k.T
        return LowRankDelta(u=problem.residual, v=d_inv_kt_c_inv.T)


class Rome(Emmet):
    """ROME: EMMET with a single fact; the same code path, limited to B = 1."""

    name = "rome"
    max_batch_size = 1
