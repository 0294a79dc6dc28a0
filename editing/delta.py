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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

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

    def dense(self) -> torch.Tensor:
        """``U Vᵀ`` in float64, summed in a fixed order (see module docstring)."""
        u = self.u.to(torch.float64)
        v = self.v.to(torch.float64)
        total = torch.zeros(u.shape[0], v.shape[0], dtype=torch.float64, device=u.device)
        for column in range(u.shape[1]):
            total += torch.outer(u[:, column], v[:, column])
        return total


def apply_delta(weight: torch.Tensor, delta: LowRankDelta) -> None:
    """Add ``delta`` to ``weight`` in place, deterministically.

    ``weight`` is the canonical (d_out × d_in) view of the parameter (for a
    GPT-2 ``Conv1D`` a transposed view, which in-place addition writes through).
    """
    if tuple(weight.shape) != (delta.u.shape[0], delta.v.shape[0]):
        raise ValueError(f"delta of shape {(delta.u.shape[0], delta.v.shape[0])} does not fit weight {tuple(weight.shape)}")
    factors = LowRankDelta(delta.u.to(weight.device), delta.v.to(weight.device))
    with torch.no_grad():
        weight.add_(factors.dense().to(weight.dtype))


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
