"""EMMET: equality-constrained memorization of a batch (Gupta et al., 2024).

``min ‖Ŵ K0 − W0 K0‖²  s.t.  Ŵ K_E = V_E``  ⇒  ``ΔW = R (K_Eᵀ C⁻¹ K_E + λ_E I)⁻¹ K_Eᵀ C⁻¹``

with ``C = λ C0 + μ I`` (``+ S`` with ``preserve_edits``). λ_E, used only when B > 1,
stabilises the B × B system, which grows ill-conditioned with B or when two facts
share a key; when the system still cannot be Cholesky-factorised (duplicate keys
with λ_E = 0) its pseudo-inverse is used, as in the authors' implementation.

λ_E is absolute, as in the authors' code, so it is only a small stabiliser when
``diag(K_Eᵀ C⁻¹ K_E)`` is large — which depends on λ and on the scale of ``C0`` (the
Llama-2 reference sets λ = 1 for EMMET). When λ_E is a sizeable share of that
diagonal the edit is ridge-regularised rather than equality-constrained:
:data:`RELAXED_SHARE` triggers a warning, and the memorization the editor records
shows by how much. ROME is this objective with B = 1 (:mod:`editing.objectives.rome`).
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


def emmet_update(c: torch.Tensor, k_e: torch.Tensor, residual: torch.Tensor, lambda_e: float) -> LowRankDelta:
    """``ΔW = R (K_Eᵀ C⁻¹ K_E + λ_E I)⁻¹ K_Eᵀ C⁻¹`` as ``U = R`` (d_out×B), ``V = C⁻¹ K_E D⁻¹`` (d_in×B)."""
    c_inv_k = torch.cholesky_solve(k_e, cholesky(c, "λ C0 + μ I (+ S)"))              # C⁻¹ K_E    (d_in, B)
    d = k_e.T @ c_inv_k                                                                 # K_Eᵀ C⁻¹ K_E   (B, B)
    if k_e.shape[1] > 1:
        mean_diagonal = float(d.diagonal().mean())
        if lambda_e > RELAXED_SHARE * mean_diagonal:
            log.warning("EMMET: λ_E = %g is %.0f%% of the mean diagonal of K_Eᵀ C⁻¹ K_E (%.3g): the constraints "
                        "are relaxed into a ridge-regularised edit; lower λ (mom2_update_weight) or λ_E",
                        lambda_e, 100 * lambda_e / mean_diagonal, mean_diagonal)
        d = d + lambda_e * torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
    factor, info = torch.linalg.cholesky_ex(d)
    if int(info) == 0:
        d_inv_kt_c_inv = torch.cholesky_solve(c_inv_k.T, factor)                        # D⁻¹ K_Eᵀ C⁻¹  (B, d_in)
    else:
        log.warning("EMMET: K_Eᵀ C⁻¹ K_E + λ_E I is singular (B=%d); using its pseudo-inverse", k_e.shape[1])
        d_inv_kt_c_inv = torch.linalg.pinv(d, hermitian=True) @ c_inv_k.T
    return LowRankDelta(u=residual, v=d_inv_kt_c_inv.T)


class Emmet(Objective):
    name = "emmet"

    def update(self, problem: EditProblem, params: ObjectiveParams) -> LowRankDelta:
        c = problem.preservation(params, self.uses_edit_memory(params))
        return emmet_update(c, problem.k_e, problem.residual, params.emmet_lambda)
