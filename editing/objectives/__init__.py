"""Objectives of the preservation–memorization framework behind one interface.

``solve(name, W0, C0, K_E, V_E, hparams)`` returns ``ΔW = U Vᵀ`` as a
:class:`~editing.delta.LowRankDelta`; new objectives register one class in
:data:`OBJECTIVES`.
"""

from __future__ import annotations

import torch

from editing.config import ObjectiveParams
from editing.delta import LowRankDelta
from editing.objectives.alphaedit import AlphaEdit
from editing.objectives.base import EditProblem, Objective
from editing.objectives.emmet import Emmet, Rome
from editing.objectives.memit import Encore, Memit

OBJECTIVES: dict[str, Objective] = {objective.name: objective for objective in
                                    (Rome(), Memit(), Emmet(), AlphaEdit(), Encore())}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def _checked(name: str, tensor: torch.Tensor, shape: tuple[int | None, ...], dtype: torch.dtype) -> torch.Tensor:
    if tensor.ndim != len(shape) or any(e is not None and s != e for s, e in zip(tensor.shape, shape)):
        wanted = "×".join("?" if e is None else str(e) for e in shape)
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {wanted}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains non-finite values")
    return tensor.detach().to(dtype)


def solve(name: str, w0: torch.Tensor, c0: torch.Tensor, k_e: torch.Tensor, v_e: torch.Tensor,
          hparams: ObjectiveParams, dtype: torch.dtype = torch.float64, edit_memory: torch.Tensor | None = None,
          null_space: torch.Tensor | None = None) -> LowRankDelta:
    """Solve one layer's edit with objective ``name``; factors in ``dtype`` (float64 unless asked
    otherwise, whatever the inputs') on the inputs' device.

    ``W0`` is d_out×d_in, ``C0`` d_in×d_in (the mean ``E[k kᵀ]``, scaled by λ
    inside), ``K_E`` d_in×B and ``V_E`` d_out×B. ``edit_memory`` is the run's
    ``S = Σ K_p K_pᵀ`` (d_in×d_in; None before any edit), read by the objectives
    that preserve earlier edits and ignored by the others; ``null_space`` the basis
    of ``C0``'s null space, for AlphaEdit.
    """
    objective = get_objective(name)
    d_out, d_in = w0.shape if w0.ndim == 2 else (None, None)
    problem = EditProblem(
        w0=_checked("W0", w0, (None, None), dtype),
        c0=_checked("C0", c0, (d_in, d_in), dtype),
        k_e=_checked("K_E", k_e, (d_in, None), dtype),
        v_e=_checked("V_E", v_e, (d_out, k_e.shape[-1]), dtype),
        edit_memory=None if edit_memory is None else _checked("S", edit_memory, (d_in, d_in), dtype),
        null_space=None if null_space is None else _checked("null-space basis", null_space, (d_in, None), dtype),
    )
    objective.check_batch_size(problem.batch_size)
    return objective.update(problem, hparams)


def memorization(w0: torch.Tensor, k_e: torch.Tensor, v_e: torch.Tensor, delta: LowRankDelta) -> float:
    """``1 − ‖(W0 + ΔW) K_E − V_E‖ / ‖V_E − W0 K_E‖`` (see :meth:`EditProblem.memorization`)."""
    dtype = torch.float64
    problem = EditProblem(w0=w0.detach().to(dtype), c0=torch.empty(0), k_e=k_e.detach().to(dtype),
                          v_e=v_e.detach().to(dtype))
    return problem.memorization(delta)


__all__ = ["EditProblem", "Objective", "OBJECTIVES", "get_objective", "memorization", "solve"]
