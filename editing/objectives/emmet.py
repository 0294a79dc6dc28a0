"""EMMET (and ROME, its one-fact case): equality-constrained memorization.

``min ‖Ŵ K0 − W0 K0‖²  s.t.  Ŵ K_E = V_E``  ⇒  ``ΔW = R D⁻¹ K_Eᵀ C⁻¹``

with ``C = λ C0 + μ I`` and ``D = K_Eᵀ C⁻¹ K_E + λ_E I`` (λ_E only when B > 1:
it stabilises the B × B system, which grows ill-conditioned with B or when two
facts share a key). So ``U = R`` and ``V = C⁻¹ K_E D⁻¹``. When ``D`` cannot be
Cholesky-factorised (e.g. duplicate keys with λ_E = 0) its pseudo-inverse is
used, as in the authors' implementation.

ROME is this objective restricted to B = 1, where ``D`` is the scalar
``k_eᵀ C⁻¹ k_e`` and the update is ROME's rank-one formula.

λ_E is absolute, as in the authors' code, so it is only a small stabiliser
when ``diag(K_Eᵀ C⁻¹ K_E)`` is large — which depends on λ and on the scale of
``C0`` (the Llama-2 reference sets λ = 1 for EMMET). When λ_E is a sizeable
share of that diagonal the edit is ridge-regularised, not equality-constrained;
:data:`RELAXED_SHARE` triggers a warning and the memorization fraction the
editor records shows by how much.
"""

from __future__ import annotations

import logging

import torch

from editing.config import ObjectiveParams
from editing.delta import LowRankDelta
from editing.objectives.base import EditProblem, Objective, cholesky

log = logging.getLogger(__name__)

RELAXED_SHARE = 0.01
"""λ_E above this share of the mean diagonal of ``K_Eᵀ C⁻¹ K_E`` visibly relaxes EMMET's constraints."""


class Emmet(Objective):
    name = "emmet"

    def update(self, problem: EditProblem, params: ObjectiveParams) -> LowRankDelta:
        k_e = problem.k_e
        c_inv_k = torch.cholesky_solve(k_e, cholesky(problem.preservation(params, self.uses_edit_memory(params)),
                                                     "λ C0 + μ I (+ S)"))
        d = k_e.T @ c_inv_k
        if problem.batch_size > 1:
            mean_diagonal = float(d.diagonal().mean())
            if params.emmet_lambda > RELAXED_SHARE * mean_diagonal:
                log.warning("EMMET: λ_E = %g is %.0f%% of the mean diagonal of K_Eᵀ C⁻¹ K_E (%.3g): the constraints "
                            "are relaxed into a ridge-regularised edit; lower λ (mom2_update_weight) or λ_E",
                            params.emmet_lambda, 100 * params.emmet_lambda / mean_diagonal, mean_diagonal)
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
