"""Evaluations, their metrics, and collapse alarms, recorded against a point of a run's history.

A *point* is a batch sequence number: 0 is the baseline before any batch,
``n`` the applied batch ``n``. Rows link to the batch itself, not just its
number, so an evaluation of a batch that is later rolled back is marked with
it, and the batch that replaces it starts with no evaluation. Recording does
not need the run's writer lock: the ``evaluate`` flow may score any recorded
point while a run goes on.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from db.chain import seal_evaluation
from db.engine import transaction
from db.errors import BatchStateError
from db.models import (EVALUATION_KINDS, AlarmRecord, BatchRecord, BatchStatus, EvaluationRecord, EvaluationStatus,
                       MetricRecord)
from db.evaluation_requests import complete_request
from db.runs import load_run


class Metric(NamedTuple):
    """One value; plain ``(name, value, split)`` tuples are accepted wherever a Metric is."""

    name: str
    value: float
    split: str = "all"


class AlarmRow(NamedTuple):
    """A collapse alarm to record with the evaluation that raised it: the rule (``METRIC:TEST:THRESHOLD``), the
    metric it fired on, the value and baseline compared, the threshold, the policy's action and a message."""

    rule: str
    metric: str
    value: float | None
    baseline: float | None
    threshold: float | None
    action: str
    message: str


def record_evaluation(engine: Engine, run_id: int, seq: int, metrics: Iterable[Metric | tuple],
                      duration_s: float | None = None, kind: str = "full", alarms: Iterable[AlarmRow] = (),
                      request: tuple[int, str] | None = None) -> int:
    """Store an evaluation of ``run_id`` at point ``seq`` with its metrics and the alarms it raised, in one
    transaction; returns its id.

    ``kind`` is ``full`` (an evaluation point) or ``health`` (the cheap check after a batch).
    ``request`` = (evaluation request id, worker) completes that request in the same transaction, so a
    request is ``done`` exactly when its metrics exist — and if the worker lost its claim meanwhile
    (:class:`db.errors.RequestLostError`), nothing is recorded and the point is not recorded twice.
    NaN values are stored as NULL (SQLite cannot store NaN) and read back as NaN.
    """
    if kind not in EVALUATION_KINDS:
        raise ValueError(f"evaluation kind must be one of {EVALUATION_KINDS}, got {kind!r}")
    rows = [Metric(*metric) for metric in metrics]
    with transaction(engine, write=True) as session:
        batch_id = _point(session, run_id, seq)
        evaluation = EvaluationRecord(run_id=run_id, batch_id=batch_id, status=EvaluationStatus.ACTIVE,
                                      duration_s=duration_s, kind=kind)
        session.add(evaluation)
        session.flush()
        if rows:
            session.execute(insert(MetricRecord), [
                {"evaluation_id": evaluation.id, "name": row.name, "split": row.split, "value": _number(row.value)}
                for row in rows])
        session.add_all(AlarmRecord(run_id=run_id, batch_id=batch_id, evaluation_id=evaluation.id, rule=alarm.rule,
                                    metric=alarm.metric, value=_number(alarm.value), baseline=_number(alarm.baseline),
                                    threshold=_number(alarm.threshold), action=alarm.action, message=alarm.message)
                        for alarm in alarms)
        session.flush()
        seal_evaluation(session, evaluation.id)
        if request is not None:
            complete_request(session, *request, evaluation_id=evaluation.id)
        return evaluation.id


def _point(session: Session, run_id: int, seq: int) -> int | None:
    """The id of applied batch ``seq`` of the run (None for the baseline 0)."""
    load_run(session, run_id)
    if seq == 0:
        return None
    batch_id = session.scalar(select(BatchRecord.id).where(
        BatchRecord.run_id == run_id, BatchRecord.seq == seq, BatchRecord.status == BatchStatus.APPLIED))
    if batch_id is None:
        raise BatchStateError(f"run {run_id} has no applied batch {seq} to evaluate")
    return batch_id


def _number(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
