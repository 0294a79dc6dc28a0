"""Norms of the edited matrices: the earliest collapse symptom (docs/math.md, "Collapse").

Sequential edits accumulate in a few MLP matrices; before a model degrades
visibly, ``‖W − W0‖_F`` (and with it ``‖W‖_F``) of an edited layer grows
sharply. Both are computed in float64 so that "no change" reads exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from editing.models.adapter import ModelAdapter


@dataclass(frozen=True)
class LayerNorms:
    """Frobenius norms of one edited matrix and of its change since the original."""

    weight: float
    """``‖W‖_F``."""
    delta: float
    """``‖W − W0‖_F``."""


@torch.no_grad()
def layer_norms(adapter: ModelAdapter, original: Mapping[int, torch.Tensor]) -> dict[int, LayerNorms]:
    """``‖W‖_F`` and ``‖W − W0‖_F`` of every layer in ``original`` (layer → W0, canonical d_out × d_in)."""
    norms = {}
    for layer, initial in sorted(original.items()):
        weight = adapter.weight(layer).detach().double()
        initial = initial.detach().to(device=weight.device, dtype=torch.float64)
        if initial.shape != weight.shape:
            raise ValueError(f"layer {layer}: original weight has shape {tuple(initial.shape)}, "
                             f"the model's is {tuple(weight.shape)}")
        norms[layer] = LayerNorms(weight=float(torch.linalg.matrix_norm(weight)),
                                  delta=float(torch.linalg.matrix_norm(weight - initial)))
    return norms
