"""The edit memory: the second moment of the keys of every edit a run has applied.

Lifelong editing methods preserve, besides ordinary text (``C0``), the edits made
earlier in the sequence: each layer keeps ``S = Σ_p K_p K_pᵀ`` over the applied
batches ``p`` (their keys ``K_E`` as used in that layer's solve) and the next
solve preserves those keys' outputs too (ENCORE, AlphaEdit; MEMIT and EMMET
with ``preserve_edits``). ``S`` is state of the run, like its weights: it must
be exactly what the applied history implies after a resume or a rollback, so
it is always a float64 sum of the stored float32 keys, in batch order — the
live run adds each batch's keys the same way the ledger's rebuild does, and
the two agree bit for bit.

RLSEdit (recursive least squares) also keeps, per layer, the running inverse
``P = (A0 + S)⁻¹`` with ``A0 = λ C0 + μ I``, updated by the Woodbury identity as each
batch's keys are added — ``F = P K``, ``P ← P − F (I + Kᵀ F)⁻¹ Fᵀ`` — so a batch costs
``O(d² B)`` instead of a new ``d³`` factorisation. It is a function of the same key
history, computed by the same :meth:`EditMemory.add` in the same order, so the ledger's
rebuild reproduces it bit for bit too.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Union

import torch

from editing.objectives.base import cholesky
from editing.objectives.rlsedit import woodbury_update

Devices = Union[Mapping[int, torch.device], torch.device, str, None]
"""Where each layer's moment lives: per layer (a model spread over devices), one device, or the keys' own."""


class EditMemory:
    """``S_l = Σ_p K_p K_pᵀ`` per edited layer (float64, d_in × d_in)."""

    def __init__(self, inverse_bases: Mapping[int, torch.Tensor] | None = None) -> None:
        self._moments: dict[int, torch.Tensor] = {}
        self._bases = None if inverse_bases is None else dict(inverse_bases)
        """Layer → ``A0`` (float64) when the running inverses are kept (RLSEdit); None otherwise."""
        self._inverses: dict[int, torch.Tensor] = {}
        self.batches = 0
        """How many batches have been added."""

    def empty(self) -> "EditMemory":
        """A memory of the same kind (with the same ``A0``) holding no batch: what a rebuild fills."""
        return EditMemory(self._bases)

    @classmethod
    def from_batches(cls, batches: Iterable[Mapping[int, torch.Tensor]], devices: Devices = "cpu",
                     inverse_bases: Mapping[int, torch.Tensor] | None = None) -> "EditMemory":
        """The memory of a history: each batch's keys (layer → d_in × B), in the order they were applied."""
        memory = cls(inverse_bases)
        for keys in batches:
            memory.add(keys, devices)
        return memory

    def add(self, keys: Mapping[int, torch.Tensor], devices: Devices = None) -> None:
        """Add one batch's keys (layer → K_E, d_in × B) to every layer's moment, on that layer's device
        (``devices``; a layer's moment stays where it was first put). The live run and the ledger's
        rebuild put each layer on the same device, so their sums agree bit for bit."""
        for layer, k in sorted(keys.items()):
            moment = self._moments.get(layer)
            if moment is not None:
                device = moment.device
            elif isinstance(devices, Mapping):
                device = devices[layer]
            else:
                device = devices or k.device
            k = k.to(device=device, dtype=torch.float64)
            if moment is None:
                moment = torch.zeros(k.shape[0], k.shape[0], dtype=torch.float64, device=device)
            self._moments[layer] = moment + k @ k.T
            if self._bases is not None:
                self._inverses[layer] = woodbury_update(self.inverse_at(layer).to(device), k)
        self.batches += 1

    def load(self, other: "EditMemory") -> None:
        """Become ``other`` (a memory rebuilt from the ledger after a rollback)."""
        self._moments = dict(other._moments)
        self._inverses = dict(other._inverses)
        self.batches = other.batches

    def inverse_at(self, layer: int) -> torch.Tensor | None:
        """``P = (A0 + S)⁻¹`` of ``layer`` (``A0⁻¹`` before any batch); None when no inverses are kept."""
        if self._bases is None:
            return None
        if layer not in self._inverses:
            base = self._bases[layer].to(torch.float64)
            self._inverses[layer] = torch.cholesky_inverse(cholesky(base, "λ C0 + μ I (RLSEdit's A0)"))
        return self._inverses[layer]

    def at(self, layer: int) -> torch.Tensor | None:
        """``S`` of ``layer``; None while no batch has edited it (S = 0)."""
        return self._moments.get(layer)

    def layers(self) -> list[int]:
        return sorted(self._moments)

