"""NAS: norm-anchor scaling of v* (SasyaTitech/NAS, ``NAS/compute_z.py`` with ``util/vstar_stats.py``).

Sequential edits fail, the NAS paper argues, because the targets' norms grow: each new ``v*`` is
optimised on a model whose values have already been pushed, and the solves write ever larger
updates. NAS fixes the target's norm instead of letting it float. At the last edit layer ``L``, for
each fact, with ``v0`` the MLP's output at the last subject token of the bare prompt and ``δ`` the
optimised delta (the loss and the optimiser are unchanged):

* ``v* = v0 + δ``;
* if ``‖v*‖ > 2 A`` the fact is not edited (``δ ← 0``): its optimisation went somewhere no ordinary
  value lives;
* else ``v* ← A · v* / ‖v*‖``, i.e. ``δ ← A · v* / ‖v*‖ − v0``.

The anchor ``A`` is a property of the *unedited* model: the mean of ``‖v0 + δ‖`` over a fixed set of
rewrites optimised on it with the same v* settings and the bare prompt only, leaving out the largest
5 % (the authors' ``_NAS_OUTLIER_UPPER_QUANTILE = 0.95``). It is computed once per model, layer and
v* settings, inside :meth:`ModelAdapter.original_state` whatever edits the model holds, and cached
beside ``C0``, so a resumed run or another worker reads the same number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import torch

from editing.config import ValueParams
from editing.data.catalog import dataset_spec
from editing.data.resolve import resolve
from editing.facts import Fact, fact_from_record
from editing.models.adapter import ModelAdapter
from editing.models.loading import cache_dir

log = logging.getLogger(__name__)

CAP = 2.0
"""A target whose norm exceeds ``CAP · A`` is dropped (``NAS/compute_z.py``: ``2 * anchor``)."""
KEPT_QUANTILE = 0.95
"""The anchor averages the norms below this quantile: the top ``floor(0.05 N)`` are left out."""
ANCHOR_SOURCES = ("counterfact-sample", "counterfact-1000")
"""Where the anchor's rewrites come from: the bundled sample (200 records, on every machine) when it holds
enough, else the 1,000-record file (the mirror's; a machine without it must fetch it)."""


def rescale(delta: torch.Tensor, v0: torch.Tensor, anchor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``δ`` (B × d) after NAS, and which facts were dropped: ``v* = v0 + δ`` scaled to norm ``anchor``,
    or ``δ = 0`` where ``‖v*‖ > CAP · anchor``."""
    v_star = v0 + delta
    norms = v_star.norm(dim=1, keepdim=True)                                             # (B, 1)
    dropped = norms[:, 0] > CAP * anchor
    scaled = v_star * (anchor / (norms + 1e-10)) - v0
    return torch.where(dropped[:, None], torch.zeros_like(delta), scaled), dropped


def trimmed_mean(norms: torch.Tensor) -> float:
    """The mean of ``norms`` without the largest ``floor((1 − KEPT_QUANTILE) N)``."""
    ordered = norms.sort().values
    left_out = math.floor((1 - KEPT_QUANTILE) * len(ordered))
    return float(ordered[:len(ordered) - left_out].mean())


def anchor_facts(n: int) -> tuple[str, list[Fact]]:
    """The first ``n`` rewrites of the first of :data:`ANCHOR_SOURCES` that holds ``n``, and its name."""
    for source in ANCHOR_SOURCES:
        if dataset_spec(source).records >= n:
            records = json.loads(resolve(source).path.read_text(encoding="utf-8"))
            return source, [fact_from_record(record, index) for index, record in enumerate(records[:n])]
    raise ValueError(f"values.nas_anchor_facts: {n} anchor rewrites asked for, the largest source "
                     f"({ANCHOR_SOURCES[-1]}) holds {dataset_spec(ANCHOR_SOURCES[-1]).records}")


def anchor_norm(adapter: ModelAdapter, layer: int, params: ValueParams) -> float:
    """``A`` for ``layer`` under the v* settings ``params`` (see the module docstring); cached."""
    from editing.v_star import compute_v_star, mlp_output_at_subject  # v_star imports this module

    plain = dataclasses.replace(params, norm_anchor_scaling=False)
    source, facts = anchor_facts(params.nas_anchor_facts)
    path = _cache_path(adapter, layer, plain, facts)
    if path.is_file():
        return float(json.loads(path.read_text())["anchor"])
    with adapter.original_state():
        result = compute_v_star(adapter, facts, layer, ("",), plain)
        v0 = mlp_output_at_subject(adapter, facts, layer)
    norms = (v0 + result.delta).norm(dim=1)
    anchor = trimmed_mean(norms)
    _write(path, {"anchor": anchor, "layer": layer, "facts": len(facts), "source": source,
                  "median": float(norms.median()), "max": float(norms.max())})
    log.info("NAS anchor at layer %d: %.3f (trimmed mean of %d v* norms; median %.3f, max %.3f)", layer, anchor,
             len(facts), float(norms.median()), float(norms.max()))
    return anchor


def _cache_path(adapter: ModelAdapter, layer: int, params: ValueParams, facts: list[Fact]) -> Path:
    key = json.dumps({"model": adapter.fingerprint, "dtype": str(adapter.model.dtype), "layer": layer,
                      "values": dataclasses.asdict(params), "facts": [f.identity_key() for f in facts],
                      "cap": CAP, "kept_quantile": KEPT_QUANTILE}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir() / "nas" / adapter.fingerprint[:16] / f"layer{layer:03d}-{digest}.json"


def _write(path: Path, data: dict) -> None:
    """Atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        json.dump(data, file)
    os.replace(temporary, path)
