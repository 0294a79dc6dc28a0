"""Low-rank weight updates ``ΔW = U Vᵀ`` and the one way they are applied.

Every objective returns its update as factors ``U`` (d_out × r) and ``V``
(d_in × r). The ledger stores the factors, not the dense matrix, and rollback
replays them; rollback is promised to be *bit-identical*, so the arithmetic
that turns factors into weights must not depend on the BLAS library, the
number of threads or the device. A matrix product does (its reduction order
varies); elementwise multiplication and addition do not (IEEE-754 rounds each
element the same everywhere). :func:`apply_delta` therefore builds ``U Vᵀ`` as
a fixed-order sum of rank-one outer products, in float64, and rounds once to the
weight's dtype. The live editor and the ledger's replay both call it, which is
why it lives here and ``db/`` imports it.

A post-update step whose result is not low rank (RECT's mask, :mod:`editing.update_steps`) yields a
:class:`DenseDelta` instead: the matrix itself, rounded to float32 once, which the ledger stores and
:func:`apply_delta` adds elementwise — as deterministic as the factors' fixed-order sum.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class LowRankDelta:
    """``ΔW = U Vᵀ`` for one edited matrix, in its canonical (d_out × d_in) orientation."""

    u: torch.Tensor
    v: torch.Tensor

    def __post_init__(self) -> None:
        if self.u.ndim != 2 or self.v.ndim != 2 or self.u.shape[1] != self.v.shape[1]:
            raise ValueError(f"factors must be (d_out×r, d_in×r), got {tuple(self.u.shape)} and {tuple(self.v.shape)}")

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape[0], self.v.shape[0]

    def dense(self) -> torch.Tensor:
        """``U Vᵀ`` in float64, summed in a fixed order (see module docstring)."""
        u = self.u.to(torch.float64)
        v = self.v.to(torch.float64)
        total = torch.zeros(u.shape[0], v.shape[0], dtype=torch.float64, device=u.device)
        for column in range(u.shape[1]):
            total += torch.outer(u[:, column], v[:, column])
        return total

    def times(self, keys: torch.Tensor) -> torch.Tensor:
        """``ΔW K`` without forming ``ΔW``, in ``keys``' dtype."""
        return self.u.to(keys) @ (self.v.to(keys).T @ keys)

    def norm(self) -> float:
        """``‖U Vᵀ‖_F`` without forming the matrix: ``sqrt(trace((UᵀU)(VᵀV)))``."""
        u, v = self.u.double(), self.v.double()
        return float(torch.sqrt(torch.clamp(((u.T @ u) * (v.T @ v)).sum(), min=0.0)))

    def to(self, device: torch.device | str) -> "LowRankDelta":
        return LowRankDelta(self.u.to(device), self.v.to(device))


@dataclass(frozen=True)
class DenseDelta:
    """``ΔW`` as the matrix itself (d_out × d_in, float32): the result of a post-update step that is not
    low rank. Rounded to float32 when made, so what is applied is exactly what the ledger stores."""

    matrix: torch.Tensor

    def __post_init__(self) -> None:
        if self.matrix.ndim != 2 or self.matrix.dtype != torch.float32:
            raise ValueError(f"a dense delta is a float32 matrix, got {self.matrix.dtype} of shape "
                             f"{tuple(self.matrix.shape)}")

    @property
    def rank(self) -> int:
        """The most it can have (the ledger's column counts stored directions, not a computed rank)."""
        return min(self.matrix.shape)

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape[0], self.matrix.shape[1]

    def dense(self) -> torch.Tensor:
        return self.matrix.to(torch.float64)

    def times(self, keys: torch.Tensor) -> torch.Tensor:
        return self.matrix.to(keys) @ keys

    def norm(self) -> float:
        return float(torch.linalg.matrix_norm(self.matrix.double()))

    def to(self, device: torch.device | str) -> "DenseDelta":
        return DenseDelta(self.matrix.to(device))


WeightDelta = Union[LowRankDelta, DenseDelta]
"""What one batch adds to one matrix: factors from an objective, or a matrix from a post-update step."""


def apply_delta(weight: torch.Tensor, delta: WeightDelta) -> None:
    """Add ``delta`` to ``weight`` in place, deterministically.

    ``weight`` is the canonical (d_out × d_in) view of the parameter (for a
    GPT-2 ``Conv1D`` a transposed view, which in-place addition writes through).
    """
    if tuple(weight.shape) != tuple(delta.shape):
        raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
    with torch.no_grad():
        weight.add_(delta.to(weight.device).dense().to(weight.dtype))


def weight_sha256(weight: torch.Tensor) -> str:
    """sha256 of a weight's canonical (d_out × d_in) values, dtype and shape.

    Hashing the canonical orientation makes the digest independent of how a
    framework happens to store the matrix.
    """
    tensor = weight.detach().to("cpu").contiguous()
    digest = hashlib.sha256()
    digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
