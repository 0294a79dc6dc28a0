"""LyapLock's run state: a virtual queue per layer that raises the weight on preservation when it is lost.

LyapLock (caskcsg/LyapLock; the code read is wpwpwpyo/LyapLock ``lyaplock/lyaplock_main.py``) treats
lifelong editing as a stochastic control problem: each batch should be written, and over the run the
*preservation loss* of each edited layer,

``D(W) = E_k ‖W k − W0 k‖² = tr((W − W0) C0 (W − W0)ᵀ)``,

must stay within a budget ``α · D_base`` (``D_base``: the loss right after the first batch). Lyapunov
optimisation turns the long-run constraint into a virtual queue ``Z`` that grows while the loss exceeds
the budget; each batch then minimises edit error plus ``a Z · w · D``. In the authors' normalised form
(``Z0 = √(α D_base)``, ``a = 1 / √(α D_base)``, floor ``√(α D_base)``) the weight ``q = a Z`` obeys

``q ← max(q + D(W_t) / (α D_base) − 1, 1)``,   ``q0 = 1``.

The authors estimate ``D`` with the statistics ``E[v kᵀ]``, ``E[k kᵀ]`` and ``E[v vᵀ]`` of the edited
module's inputs and outputs on Wikipedia. For the edited (linear) module ``v = W0 k (+ b)``, so those are
``W0 C0`` and ``W0 C0 W0ᵀ`` and ``D`` is the closed form above: seqedit computes it from ``C0`` and ``W0``,
exactly and without a second pass over the text.

The state per layer — ``q``, ``D_base`` and the values of the earlier edits ``Σ_p V_p K_pᵀ`` with
``V_p = W_p K_p`` (the layer's output for batch ``p``'s keys right after it was edited) — is a function
of the applied history: the ledger's rebuild replays the batches' weights and keys in order
(:func:`db.replay.replay_history`) through the same :meth:`LyapunovQueue.add`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class LyapunovTerms:
    """What one layer's LyapLock solve needs besides ``C0``, ``K``, ``R`` and ``S``."""

    weight: float
    """``q · w``: the queue-scaled weight on the preservation loss."""
    drift: torch.Tensor
    """``Σ_p V_p K_pᵀ − W S``: how far the earlier edits' outputs have moved since they were written (d_out × d_in)."""
    anchor: torch.Tensor
    """``(W0 − W) C0``: the pull back towards the unedited layer (d_out × d_in)."""


def preservation_loss(weight: torch.Tensor, original: torch.Tensor, c0: torch.Tensor) -> float:
    """``D(W) = tr((W − W0) C0 (W − W0)ᵀ)`` in float64."""
    change = weight.double() - original.to(weight.device, torch.float64)
    return float(((change @ c0.to(change)) * change).sum())


class LyapunovQueue:
    """Per edited layer: the queue weight ``q``, ``D_base`` and ``Σ_p V_p K_pᵀ``."""

    def __init__(self, alpha: float, originals: Mapping[int, torch.Tensor], second_moments: Mapping[int, torch.Tensor]) -> None:
        self.alpha = alpha
        self._originals = dict(originals)
        self._moments = dict(second_moments)
        self.q: dict[int, float] = {layer: 1.0 for layer in originals}
        self.d_base: dict[int, float | None] = {layer: None for layer in originals}
        self._values: dict[int, torch.Tensor] = {}
        self.batches = 0

    def empty(self) -> "LyapunovQueue":
        """A queue of the same layers and statistics before any batch: what a rebuild fills."""
        return LyapunovQueue(self.alpha, self._originals, self._moments)

    def terms(self, layer: int, weight: torch.Tensor, memory: torch.Tensor | None, mom2_weight: float) -> LyapunovTerms:
        """The solve's terms for ``layer`` at its current ``weight`` and edit memory ``S`` (None: no edit yet)."""
        w = weight.double()
        values = self._values.get(layer)
        drift = torch.zeros_like(w) if values is None else values.to(w) - w @ memory.to(w)
        anchor = (self._originals[layer].to(w) - w) @ self._moments[layer].to(w)
        return LyapunovTerms(weight=self.q[layer] * mom2_weight, drift=drift, anchor=anchor)

    def add(self, weights: Mapping[int, torch.Tensor], keys: Mapping[int, torch.Tensor]) -> None:
        """Count one applied batch: ``weights`` are the layers right after it, ``keys`` its ``K_E`` per layer."""
        for layer, k in sorted(keys.items()):
            w = weights[layer].double()
            k = k.to(w.device, torch.float64)
            values = (w @ k) @ k.T
            self._values[layer] = values if layer not in self._values else self._values[layer].to(w) + values
            loss = preservation_loss(w, self._originals[layer], self._moments[layer])
            if self.d_base[layer] is None and loss > 0:
                self.d_base[layer] = loss
            if self.d_base[layer] is not None:
                self.q[layer] = max(self.q[layer] + loss / (self.alpha * self.d_base[layer]) - 1.0, 1.0)
        self.batches += 1

    def load(self, other: "LyapunovQueue") -> None:
        """Become ``other`` (rebuilt from the ledger after a rollback or on resume)."""
        self.q, self.d_base = dict(other.q), dict(other.d_base)
        self._values = dict(other._values)
        self.batches = other.batches
