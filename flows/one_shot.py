"""The one-shot edit: facts from a file, edited in batches, measured before and after.

No database and no Prefect: this is the library used directly, the way a study
script would, and what ``seqedit edit`` runs. Every record is validated before
the model is touched, so a bad record stops the command with nothing applied.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editing.config import EditConfig, hparams_key_for, layer_overrides, load_edit_config
from editing.editor import Editor
from editing.evaluation import counterfact_metrics
from editing.facts import Fact, fact_from_record
from editing.models import ModelAdapter, load_model
from editing.objectives import get_objective
from editing.runtime import Runtime

METRIC_KEYS = ("ES", "PS", "NS", "EM", "PM", "NM", "S")


@dataclass(frozen=True)
class OneShotRequest:
    """What ``seqedit edit`` was asked to do."""

    facts_path: Path
    algorithm: str
    batch_size: int = 1
    limit: int | None = None
    layers: tuple[int, ...] | None = None
    model: str | None = None
    hparams: str | None = None
    """Hyperparameter file name (``editing/hparams/<name>.yaml``); guessed from the model name when omitted."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted hyperparameter overrides, e.g. ``{"values.steps": 10}``."""
    save: Path | None = None
    eval_batch_size: int = 16
    runtime: Runtime = field(default_factory=Runtime)


def read_facts(path: Path, limit: int | None = None) -> list[Fact]:
    """Validated facts of a CounterFact-style file (full or reduced schema, JSON or JSONL).

    All records are checked before any is returned: one bad record raises a
    :class:`~editing.facts.FactValidationError` naming it.
    """
    from db.readers import read_records

    facts = []
    for record in read_records(path):
        if limit is not None and len(facts) >= limit:
            break
        if record.error is not None:
            raise record.error
        facts.append(fact_from_record(record.data, record.location))
    if not facts:
        raise ValueError(f"{path} holds no facts")
    return facts


def edit_config_for(adapter: ModelAdapter, request: OneShotRequest) -> EditConfig:
    overrides = dict(request.overrides)
    if request.layers is not None:
        overrides.update(layer_overrides(request.layers, overrides.get("distribution")))
    return load_edit_config(request.hparams or hparams_key_for(adapter.name), request.algorithm,
                            overrides)


def run_one_shot(request: OneShotRequest) -> dict[str, Any]:
    """Edit and measure; returns the report that ``seqedit edit --json`` prints.

    ``memorization`` maps each edited layer to the share of its assigned residual the
    updates wrote (``1 − ‖Ŵ K_E − V_E‖ / ‖R‖``), averaged over the batches.
    """
    started = time.perf_counter()
    if request.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {request.batch_size}")
    get_objective(request.algorithm).check_batch_size(request.batch_size)
    facts = read_facts(request.facts_path, request.limit)
    request.runtime.apply_threads()
    runtime = request.runtime
    adapter = load_model(request.model, dtype=runtime.model_dtype,
                         **({"device_map": runtime.device_map} if runtime.device_map is not None
                            else {"device": runtime.torch_device}))
    config = edit_config_for(adapter, request)
    seconds = {"stats": 0.0, "prefixes": 0.0, "v_star": 0.0, "keys": 0.0, "solve": 0.0, "eval": 0.0}

    tick = time.perf_counter()
    pre = counterfact_metrics(adapter, facts, batch_size=request.eval_batch_size).metrics()
    seconds["eval"] += time.perf_counter() - tick

    editor = Editor.prepare(adapter, config, runtime=request.runtime)
    for part, spent in editor.prepare_seconds.items():
        seconds[part] += spent
    achieved: dict[int, list[float]] = {}
    for start in range(0, len(facts), request.batch_size):
        batch = editor.apply(facts[start:start + request.batch_size])
        editor.remember(batch)  # later batches preserve this one's keys (AlphaEdit, ENCORE, preserve_edits)
        for part in ("v_star", "keys", "solve"):
            seconds[part] += batch.seconds[part]
        for layer, value in batch.memorization.items():
            achieved.setdefault(layer, []).append(value)

    tick = time.perf_counter()
    post = counterfact_metrics(adapter, facts, batch_size=request.eval_batch_size).metrics()
    seconds["eval"] += time.perf_counter() - tick
    if request.save is not None:
        adapter.model.save_pretrained(request.save)
        adapter.tokenizer.save_pretrained(request.save)
    seconds["total"] = time.perf_counter() - started
    return {
        "algorithm": config.algorithm,
        "model": adapter.name,
        "distribution": config.distribution,
        "n_facts": len(facts),
        "batch_size": request.batch_size,
        "layers": list(editor.layers),
        "pre": {key: pre.get(key.lower()) for key in METRIC_KEYS},
        "post": {key: post.get(key.lower()) for key in METRIC_KEYS},
        "memorization": {str(layer): sum(values) / len(values) for layer, values in achieved.items()},
        "seconds": {key: round(value, 3) for key, value in seconds.items()},
        "hparams": config.to_dict(),
    }
