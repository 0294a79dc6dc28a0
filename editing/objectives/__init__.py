"""Objectives of the preservation–memorization framework behind one interface.

``solve(name, C0, K_E, R, hparams)`` returns ``ΔW = U Vᵀ`` as a
:class:`~editing.delta.LowRankDelta`; new objectives register one class in
:data:`OBJECTIVES`. Each module holds one update, written as its equation
(docs/math.md, "The objectives"): EMMET and its one-fact case ROME, MEMIT and
ENCORE (MEMIT preserving the run's earlier edits), AlphaEdit, RLSEdit (the same
least squares kept recursively), LyapLock (a virtual queue on the preservation loss).
"""

from __future__ import annotations

import torch

from editing.config import ObjectiveParams
from editing.delta import WeightDelta
from editing.lyapunov import LyapunovTerms
from editing.objectives.alphaedit import AlphaEdit
from editing.objectives.base import EditProblem, Objective, memorization
from editing.objectives.emmet import Emmet
from editing.objectives.encore import Encore
from editing.objectives.memit import Memit
from editing.objectives.lyaplock import LyapLock
from editing.objectives.rlsedit import RlsEdit
from editing.objectives.rome import Rome

OBJECTIVES: dict[str, Objective] = {objective.name: objective for objective in
                                    (Rome(), Memit(), Emmet(), AlphaEdit(), Encore(), RlsEdit(), LyapLock())}

METHOD_OBJECTIVES: dict[str, str] = {"nas": "memit", "rect": "memit", "prune": "memit",
                                     "alphaedit-published": "alphaedit", "encore-published": "encore"}
"""Methods that are an objective with settings, not an objective of their own: ``--algo nas`` is MEMIT
with ``values.norm_anchor_scaling``, ``--algo rect`` MEMIT with ``objective.rect_keep_fraction``, ``--algo
prune`` MEMIT with ``restraint: prune`` — as their papers apply them; ``alphaedit-published`` and
``encore-published`` those objectives with their authors' v* settings. Their settings are the hparams file's section of that name; the same settings compose
with any objective (``--algo alphaedit --set values.norm_anchor_scaling=true``)."""

ALGORITHMS: tuple[str, ...] = (*OBJECTIVES, *METHOD_OBJECTIVES)
"""Every name ``--algo`` and a study spec accept."""


def get_objective(name: str) -> Objective:
    """The objective of algorithm ``name`` (an objective, or a method built on one)."""
    name = METHOD_OBJECTIVES.get(name, name)
    if name not in OBJECTIVES:
        raise ValueError(f"unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}")
    return OBJECTIVES[name]


def _checked(name: str, tensor: torch.Tensor, shape: tuple[int | None, ...], dtype: torch.dtype) -> torch.Tensor:
    if tensor.ndim != len(shape) or any(e is not None and s != e for s, e in zip(tensor.shape, shape)):
        wanted = "×".join("?" if e is None else str(e) for e in shape)
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {wanted}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains non-finite values")
    return tensor.detach().to(dtype)


def solve(name: str, c0: torch.Tensor, k_e: torch.Tensor, residual: torch.Tensor, hparams: ObjectiveParams,
          dtype: torch.dtype = torch.float64, edit_memory: torch.Tensor | None = None,
          null_space: torch.Tensor | None = None, running_inverse: torch.Tensor | None = None,
          lyapunov: LyapunovTerms | None = None) -> WeightDelta:
    """Solve one layer's edit with objective ``name``; factors in ``dtype`` (float64 unless asked
    otherwise, whatever the inputs') on the inputs' device.

    ``C0`` is d_in×d_in (the mean ``E[k kᵀ]``, scaled by λ inside), ``K_E`` d_in×B and ``R``
    d_out×B, the residual the layer must write for those keys (``V_E − W0 K_E``). ``edit_memory``
    is the run's ``S = Σ K_p K_pᵀ`` (d_in×d_in; None before any edit), read by the objectives
    that preserve earlier edits and ignored by the others; ``null_space`` the basis of ``C0``'s
    null space, for AlphaEdit; ``running_inverse`` RLSEdit's ``P = (λ C0 + μ I + S)⁻¹``; ``lyapunov`` LyapLock's
    queue terms.
    """
    objective = get_objective(name)
    d_in = c0.shape[0] if c0.ndim == 2 else None
    problem = EditProblem(
        c0=_checked("C0", c0, (d_in, d_in), dtype),
        k_e=_checked("K_E", k_e, (d_in, None), dtype),
        residual=_checked("R", residual, (None, k_e.shape[-1]), dtype),
        edit_memory=None if edit_memory is None else _checked("S", edit_memory, (d_in, d_in), dtype),
        null_space=None if null_space is None else _checked("null-space basis", null_space, (d_in, None), dtype),
        running_inverse=None if running_inverse is None else _checked("P", running_inverse, (d_in, d_in), dtype),
        lyapunov=lyapunov,
    )
    objective.check_batch_size(problem.batch_size)
    return objective.update(problem, hparams)


__all__ = ["ALGORITHMS", "EditProblem", "METHOD_OBJECTIVES", "Objective", "OBJECTIVES", "get_objective",
           "memorization", "solve"]
