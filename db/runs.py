"""Runs: create one (with its original weights as checkpoint 0), read it back, set its status.

A run is created with the edited layers' weights *before* any batch, stored
as the origin checkpoint: rolling back to 0, or replaying from the start,
never needs the model to be loaded again, and the sha256 of each original layer
identifies the starting point (a resumed run checks its freshly loaded model
against it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping

import torch
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from db.engine import transaction
from db.errors import RunNotFoundError
from db.models import FACT_POOLS, Checkpoint, RunRecord, RunStatus
from db.tensors import weight_to_bytes
from editing.delta import weight_sha256


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run; stored column for column in ``runs``."""

    model_name: str
    algorithm: str
    distribution: str
    batch_size: int
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    """JSON-serialisable (e.g. ``dataclasses.asdict`` of the edit configuration)."""
    eval_every: int = 0
    checkpoint_every: int = 10
    collapse_policy: Mapping[str, Any] = field(default_factory=dict)
    model_revision: str | None = None
    model_fingerprint: str | None = None
    name: str | None = None
    fact_pool: str = "shared"
    """``shared`` or ``private`` (see :class:`db.models.RunRecord`)."""
    fact_source: str | None = None
    parent_run_id: int | None = None
    """A branch (:mod:`db.branch`): the run whose history up to ``parent_seq`` it shares, and the fact it
    leaves out of the parent's later batches."""
    parent_seq: int | None = None
    retracted_fact_id: int | None = None
    branch_reason: str | None = None

    def __post_init__(self) -> None:
        if self.fact_pool not in FACT_POOLS:
            raise ValueError(f"fact_pool must be one of {FACT_POOLS}, got {self.fact_pool!r}")
        if self.fact_pool == "private" and not self.fact_source:
            raise ValueError("a private fact pool needs a fact_source: the source whose facts the run edits")


@dataclass(frozen=True)
class RunInfo:
    id: int
    spec: RunSpec
    status: RunStatus
    original_sha256: dict[int, str]
    """sha256 of each edited layer before the first batch, by layer index."""
    created_at: datetime
    updated_at: datetime

    @property
    def layers(self) -> tuple[int, ...]:
        """The edited layers, in ascending order."""
        return tuple(sorted(self.original_sha256))


SPEC_FIELDS = tuple(spec_field.name for spec_field in dataclasses.fields(RunSpec))


def create_run(engine: Engine, spec: RunSpec, initial_weights: Mapping[int, torch.Tensor]) -> RunInfo:
    """Record a new run and its edited layers' weights before any edit (canonical d_out × d_in)."""
    if not initial_weights:
        raise ValueError("a run needs the initial weights of at least one edited layer")
    blobs = {int(layer): (weight_to_bytes(weight), weight_sha256(weight)) for layer, weight in initial_weights.items()}
    values = {name: getattr(spec, name) for name in SPEC_FIELDS}
    values["hyperparameters"] = dict(spec.hyperparameters)
    values["collapse_policy"] = dict(spec.collapse_policy)
    with transaction(engine, write=True) as session:
        run = RunRecord(**values, status=RunStatus.CREATED)
        session.add(run)
        session.flush()
        session.add_all(Checkpoint(run_id=run.id, batch_id=None, layer=layer, weights=blob, sha256=sha)
                        for layer, (blob, sha) in blobs.items())
        session.flush()
        return _info(session, run)


def get_run(engine: Engine, run_id: int) -> RunInfo:
    with transaction(engine) as session:
        return _info(session, load_run(session, run_id))


def set_run_status(engine: Engine, run_id: int, status: RunStatus | str) -> None:
    status = RunStatus(status)
    with transaction(engine, write=True) as session:
        if session.execute(update(RunRecord).where(RunRecord.id == run_id).values(status=status)).rowcount != 1:
            raise RunNotFoundError(f"no run {run_id}")


def load_run(session: Session, run_id: int) -> RunRecord:
    run = session.get(RunRecord, run_id)
    if run is None:
        raise RunNotFoundError(f"no run {run_id}")
    return run


def _info(session: Session, run: RunRecord) -> RunInfo:
    hashes = session.execute(select(Checkpoint.layer, Checkpoint.sha256)
                             .where(Checkpoint.run_id == run.id, Checkpoint.batch_id.is_(None))).tuples().all()
    return RunInfo(id=run.id, spec=RunSpec(**{name: getattr(run, name) for name in SPEC_FIELDS}),
                   status=run.status, original_sha256=dict(hashes), created_at=run.created_at,
                   updated_at=run.updated_at)
