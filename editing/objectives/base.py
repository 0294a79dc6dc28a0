"""The preservation–memorization problem and the interface every objective implements.

One layer, one batch (MATH.md): keep ``Ŵ K0 ≈ W0 K0`` for the preserved keys,
summarised by their second moment ``C0``, while making ``Ŵ K_E`` equal (or
close) to ``V_E``. Objectives differ only in how they trade the two off; each
returns ``ΔW = U Vᵀ`` as factors with ``U = R = V_E − W0 K_E``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from editing.config import ObjectiveParams
from editing.delta import LowRankDelta


@dataclass(frozen=True)
class EditProblem:
    """One layer's problem, in float64: ``W0`` (d_out×d_in), ``C0`` (d_in×d_in), ``K_E`` (d_in×B), ``V_E`` (d_out×B)."""

    w0: torch.Tensor
    c0: torch.Tensor
    k_e: torch.Tensor
    v_e: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.k_e.shape[1]

    @property
    def residual(self) -> torch.Tensor:
        """``R = V_E − W0 K_E``: what the layer must add for the edited keys."""
        return self.v_e - self.w0 @ self.k_e

    def preservation(self, params: ObjectiveParams) -> torch.Tensor:
        """``C = λ C0 + μ I``: the weighted preserved-key moment with its norm ridge."""
        identity = torch.eye(self.c0.shape[0], dtype=self.c0.dtype, device=self.c0.device)
        return params.mom2_update_weight * self.c0 + params.update_norm_lambda * identity


class Objective(ABC):
    """An update rule for :class:`EditProblem`; registered by name in :mod:`editing.objectives`."""

    name: str
    max_batch_size: int | None = None

    def check_batch_size(self, batch_size: int) -> None:
        if self.max_batch_size is not None and batch_size > self.max_batch_size:
            raise ValueError(f"{self.name} edits at most {self.max_batch_size} fact(s) at a time, got a batch of "
                             f"{batch_size}; use batch size {self.max_batch_size}, or memit/emmet for batches")

    @abstractmethod
    def update(self, problem: EditProblem, params: ObjectiveParams) -> LowRankDelta:
        """The factors of ``ΔW`` (float64)."""


def cholesky(matrix: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor, or a clear error saying which matrix is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise ValueError(f"{what} is not positive definite (Cholesky failed at column {int(info)}); "
                         "raise update_norm_lambda (μ) or estimate C0 from more text")
    return factor
