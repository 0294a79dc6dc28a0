"""The preservation–memorization problem and the interface every objective implements.

One layer, one batch (docs/math.md, "The objectives"): keep ``Ŵ K0 ≈ W0 K0`` for the
preserved keys, summarised by their second moment ``C0``, while making ``Ŵ K_E``
equal (or close) to ``V_E = W0 K_E + R``. Objectives differ only in how they trade
the two off; each returns ``ΔW = U Vᵀ`` as factors with ``U = R``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from editing.config import ObjectiveParams
from editing.delta import WeightDelta
from editing.lyapunov import LyapunovTerms

log = logging.getLogger(__name__)

RIDGE_STEPS = (1e-10, 1e-8, 1e-6, 1e-4)
"""Ridges tried, relative to the mean diagonal, when a system that should be positive definite is not:
an estimated ``C0`` is only positive *semi*-definite when it saw fewer distinct keys than its dimension,
and float rounding can push its smallest eigenvalues just below zero."""


@dataclass(frozen=True)
class EditProblem:
    """One layer's problem, in float64: ``C0`` (d_in×d_in), the keys ``K_E`` (d_in×B) and the residual
    ``R = V_E − W0 K_E`` (d_out×B) the update must write for them, and, for the objectives that use them,
    the run's edit memory ``S`` (d_in×d_in; None: no earlier edit) and the basis ``Û`` (d_in×k) of ``C0``'s
    null space. The weights themselves never enter: every objective's ``ΔW`` depends on ``W0`` only
    through ``R`` (docs/math.md, "The objectives")."""

    c0: torch.Tensor
    k_e: torch.Tensor
    residual: torch.Tensor
    edit_memory: torch.Tensor | None = None
    null_space: torch.Tensor | None = None
    running_inverse: torch.Tensor | None = None
    """RLSEdit's ``P = (λ C0 + μ I + S)⁻¹`` (d_in×d_in), kept by the edit memory."""
    lyapunov: LyapunovTerms | None = None
    """LyapLock's queue-weighted preservation and drift terms at the layer's current weight."""

    @property
    def batch_size(self) -> int:
        return self.k_e.shape[1]

    def preservation(self, params: ObjectiveParams, with_edits: bool = False) -> torch.Tensor:
        """``C = λ C0 + μ I (+ S)``: the weighted preserved-key moment, its norm ridge and, ``with_edits``,
        the keys of the run's earlier edits."""
        identity = torch.eye(self.c0.shape[0], dtype=self.c0.dtype, device=self.c0.device)
        c = params.mom2_update_weight * self.c0 + params.update_norm_lambda * identity
        if with_edits and self.edit_memory is not None:
            c = c + self.edit_memory
        return c


def memorization(k_e: torch.Tensor, residual: torch.Tensor, delta: WeightDelta) -> float:
    """``1 − ‖ΔW K_E − R‖ / ‖R‖``: the share of the residual an update actually writes (``Ŵ K_E − V_E`` is
    ``ΔW K_E − R``). 1 for an exact (equality-constrained) edit, less for a least-squares or ridge-relaxed
    one — the diagnostic that shows, e.g., EMMET's λ_E outweighing its constraints."""
    scale = torch.linalg.norm(residual)
    if scale == 0:
        return 1.0
    miss = delta.times(k_e.to(residual)) - residual
    return float(1 - torch.linalg.norm(miss) / scale)


class Objective(ABC):
    """An update rule for :class:`EditProblem`; registered by name in :mod:`editing.objectives`."""

    name: str
    max_batch_size: int | None = None
    needs_null_space: bool = False
    """True for objectives that project onto ``C0``'s null space (AlphaEdit)."""
    needs_running_inverse: bool = False
    """True for objectives that read the running inverse of the preservation matrix (RLSEdit)."""
    needs_lyapunov: bool = False
    """True for objectives that read a virtual queue's terms (LyapLock)."""

    def uses_edit_memory(self, params: ObjectiveParams) -> bool:
        """Whether the solve reads the run's edit memory ``S`` (so the run must keep it)."""
        return params.preserve_edits

    def check_batch_size(self, batch_size: int) -> None:
        if self.max_batch_size is not None and batch_size > self.max_batch_size:
            raise ValueError(f"{self.name} edits at most {self.max_batch_size} fact(s) at a time, got a batch of "
                             f"{batch_size}; use batch size {self.max_batch_size}, or memit/emmet for batches")

    @abstractmethod
    def update(self, problem: EditProblem, params: ObjectiveParams) -> WeightDelta:
        """The factors of ``ΔW`` (float64), or the dense update of an objective whose ``ΔW`` is not low rank."""


def cholesky(matrix: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric matrix that should be positive definite.

    When it is not, a growing ridge (:data:`RIDGE_STEPS` × its mean diagonal) is
    added until it is, with a warning, so that a rank-deficient ``C0`` does not
    abort a batch mid-run; a matrix that no small ridge repairs (one with large
    negative eigenvalues is not a preservation matrix at all) is a clear error.
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return factor
    scale = float(matrix.diagonal().abs().mean())
    identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for relative in RIDGE_STEPS:
        factor, retry = torch.linalg.cholesky_ex(matrix + relative * scale * identity)
        if int(retry) == 0:
            log.warning("%s is not positive definite (Cholesky failed at column %d); solved with a ridge of "
                        "%.1e × its mean diagonal (%.3g) added", what, int(info), relative, relative * scale)
            return factor
    raise ValueError(f"{what} is not positive definite (Cholesky failed at column {int(info)}, and still with a "
                     f"ridge of {RIDGE_STEPS[-1]:g} × its mean diagonal); raise update_norm_lambda (μ) or "
                     "estimate C0 from more text")
