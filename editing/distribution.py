"""Edit distribution: how one batch's change is spread over the edit layers.

docs/math.md ("Edit distribution"): the target residuals ``z`` (v*) are computed once
at the last edit layer ``l_T``; then, layer by layer, with earlier updates already
applied, the keys ``K^{l_t}`` and the current residuals ``z_cur`` are read,
a share of the remaining residual ``z − z_cur`` becomes that layer's residual ``R``,
and any objective solves for the layer's update.

The strategies differ only in which layers they edit and which share of the
remaining residual each gets, so that is all an :class:`EditDistribution`
states; :func:`distribute` is the one loop that runs them with any objective.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from editing.config import ObjectiveParams
from editing.delta import WeightDelta
from editing.keys import compute_keys
from editing.rows import RewriteRows
from editing.lyapunov import LyapunovQueue
from editing.memory import EditMemory
from editing.models.adapter import ModelAdapter
from editing.objectives import memorization, solve
from editing.update_steps import rect


class EditDistribution(ABC):
    """Which layers an edit touches and the share of the remaining residual each takes."""

    name: str

    @abstractmethod
    def edit_layers(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        """The layers to edit, in order; the last one is where targets are computed."""

    @abstractmethod
    def residual_share(self, step: int, n_steps: int) -> float:
        """Fraction of the remaining residual assigned at ``step`` (0-based) of ``n_steps``."""


class SingleLayer(EditDistribution):
    """ROME-style: the whole residual goes into one layer."""

    name = "single_layer"

    def edit_layers(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        if len(layers) != 1:
            raise ValueError(f"single_layer edits exactly one layer, got layers {list(layers)}; "
                             "pass one layer or use distribution memit_spread")
        return layers

    def residual_share(self, step: int, n_steps: int) -> float:
        return 1.0


class MemitSpread(EditDistribution):
    """MEMIT's: layer ``l_t`` takes ``1 / (T − t + 1)`` of what is still missing (1-based ``t``)."""

    name = "memit_spread"

    def edit_layers(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        return layers

    def residual_share(self, step: int, n_steps: int) -> float:
        return 1.0 / (n_steps - step)


DISTRIBUTIONS: dict[str, EditDistribution] = {d.name: d for d in (SingleLayer(), MemitSpread())}


def get_distribution(name: str) -> EditDistribution:
    if name not in DISTRIBUTIONS:
        raise ValueError(f"unknown edit distribution {name!r}; known: {sorted(DISTRIBUTIONS)}")
    return DISTRIBUTIONS[name]


@dataclass
class LayerUpdate:
    layer: int
    delta: WeightDelta
    memorization: float
    """Share of the assigned residual the update writes: ``1 − ‖ΔW K_E − R‖ / ‖R‖`` (1: exact)."""
    keys: torch.Tensor
    """``K_E`` as solved for (d_in × B, float32, CPU): what the edit memory adds and the ledger keeps."""


@dataclass(frozen=True)
class LayerSolver:
    """Everything a layer's solve needs besides the batch: the objective, its weights, the preserved
    keys' statistics per layer, the dtype the linear algebra runs in (float64 by default, whatever the
    model's dtype), and — for the objectives that use them — the run's edit memory, ``C0``'s null spaces and
    LyapLock's queue."""

    algorithm: str
    params: ObjectiveParams
    second_moments: Mapping[int, torch.Tensor]
    dtype: torch.dtype = torch.float64
    memory: EditMemory | None = None
    null_spaces: Mapping[int, torch.Tensor] | None = None
    lyapunov: LyapunovQueue | None = None

    def solve(self, layer: int, k_e: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> WeightDelta:
        """``ΔW`` of ``layer`` for keys ``K_E`` (d_in×B) and residual ``R`` (d_out×B), on their device, after
        the configured post-update step (:mod:`editing.update_steps`) against the layer's current ``weight``."""
        memory = self.memory.at(layer) if self.memory is not None else None
        inverse = self.memory.inverse_at(layer) if self.memory is not None else None
        null_space = self.null_spaces[layer] if self.null_spaces is not None else None
        terms = (self.lyapunov.terms(layer, weight, memory, self.params.mom2_update_weight)
                 if self.lyapunov is not None else None)
        delta = solve(self.algorithm, self.second_moments[layer], k_e, residual, self.params, dtype=self.dtype,
                      edit_memory=None if memory is None else memory.to(k_e.device), null_space=null_space,
                      running_inverse=None if inverse is None else inverse.to(k_e.device), lyapunov=terms)
        if self.params.rect_keep_fraction is not None:
            delta = rect(delta, weight, self.params.rect_keep_fraction)
        return delta


def distribute(adapter: ModelAdapter, rows: RewriteRows, z: torch.Tensor, layers: tuple[int, ...],
               distribution: EditDistribution, solver: LayerSolver,
               on_layer: Callable[[LayerUpdate, float], None] | None = None) -> list[LayerUpdate]:
    """Spread the target residuals ``z`` (v*, B × d, at the last edit layer) over ``layers``,
    applying each layer's update to the model before the next layer's keys are read — MEMIT's loop:

    for each edit layer ``l`` (step ``t`` of ``T``): the keys ``K_E`` at ``l`` and the current output
    ``z_cur`` at the last layer, on the model as edited so far; ``R = (z − z_cur) · share(t)``
    (``1 / (T − t)`` for ``memit_spread``); ``ΔW = objective(C0, K_E, R)``; ``W ← W + ΔW``.

    ``on_layer`` is called after each layer is updated, with the update and the seconds its solve and
    apply took (the rest is reading keys).
    """
    edit_layers = distribution.edit_layers(layers)
    target_layer = edit_layers[-1]
    updates = []
    for step, layer in enumerate(edit_layers):
        keys, z_cur = compute_keys(adapter, rows, layer, len(z), residual_layer=target_layer)    # (B, d_in), (B, d)
        residual = (z - z_cur) * distribution.residual_share(step, len(edit_layers))             # (B, d)
        started = time.perf_counter()
        weight = adapter.weight(layer)                                                                  # (d, d_in)
        k_e = keys.T.to(weight.device, solver.dtype)                                                    # (d_in, B)
        r = residual.T.to(weight.device, solver.dtype)                                                  # (d, B)
        delta = solver.solve(layer, k_e, r, weight)
        adapter.add_delta(layer, delta)
        update = LayerUpdate(layer, delta, memorization(k_e, r, delta), keys.T.contiguous())
        updates.append(update)
        if on_layer is not None:
            on_layer(update, time.perf_counter() - started)
    return updates
