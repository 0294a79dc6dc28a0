"""Post-update steps: rules that change an objective's ``ΔW`` before it is written into the layer.

Some lifelong-editing methods keep the objective and restrain what it writes. Each rule here takes the
objective's update and the layer's current weight and returns the update to apply; :class:`LayerSolver`
runs it right after the solve, so the next layer's keys are read on the model as it was really edited
(MEMIT's loop applies each layer before reading the next, and so do these methods' codes).

* **RECT** (Gu et al., 2024, "Model editing harms general abilities"; the MEMIT reimplementation in
  SasyaTitech/NAS ``baselines/memit/memit_rect_main.py``): only the entries with the largest *relative*
  change ``|ΔW_ij| / |W_ij + ε|`` are written — the top ``keep`` fraction of the whole matrix, ties kept —
  and the rest of ``ΔW`` is dropped, so an update cannot rewrite a weight many times its own size.
"""

from __future__ import annotations

import torch

from editing.delta import DenseDelta, WeightDelta

RECT_EPSILON = 1e-8
"""Added to the (signed) weight in the ratio's denominator, as in the reimplementation."""


def rect(delta: WeightDelta, weight: torch.Tensor, keep: float) -> DenseDelta:
    """RECT's filter of ``delta`` against the current ``weight`` (d_out × d_in): the entries whose ratio
    ``|ΔW| / |W + ε|`` is at least the ``k``-th smallest, ``k = ⌊(1 − keep) · n⌋`` (at least 1), keep their
    value; every other entry is zero."""
    if not 0 < keep <= 1:
        raise ValueError(f"objective.rect_keep_fraction must be in (0, 1], got {keep}")
    change = delta.dense().to(weight.device)                                            # (d_out, d_in) float64
    ratio = (change / (weight.double() + RECT_EPSILON)).abs()
    k = max(1, int(ratio.numel() * (1 - keep)))
    threshold = ratio.flatten().kthvalue(k).values
    return DenseDelta(torch.where(ratio >= threshold, change, torch.zeros_like(change)).float())
