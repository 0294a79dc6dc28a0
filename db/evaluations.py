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

from db.engine import transaction
from db.errors import BatchStateError
from db.models import AlarmRecord, BatchRecord, BatchStatus, EvaluationRecord, EvaluationStatus, MetricRecord
from db.runs import load_run


class Metric(NamedTuple):
    """One value; plain ``(name, value, split)`` tuples are accepted wherever a Metric is."""

    name: str
    value: float
    split: str = "all"


def record_evaluation(engine: Engine, run_id: int, seq: int, metrics: Iterable[Metric | tuple],
                      duration_s: float | None = None) -> int:
    """Store an evaluation of ``run_id`` at point ``seq`` with its metrics; returns its id.

    NaN values are stored as NULL (SQLite cannot store NaN) and read back as NaN.
    """
    rows = [Metric(*metric) for metric in metrics]
    with transaction(engine, write=True) as session:
        batch_id = _point(session, run_id, seq)
        evaluation = EvaluationRecord(run_id=run_id, batch_id=batch_id, status=EvaluationStatus.ACTIVE,
                                      duration_s=duration_s)
        session.add(evaluation)
        session.flush()
        if rows:
            session.execute(insert(MetricRecord), [
                {"evaluation_id": evaluation.id, "name": row.name, "split": row.split, "value": _number(row.value)}
                for row in rows])
        return evaluation.id


def record_alarm(engine: Engine, run_id: int, seq: int, *, rule: str, metric: str, value: float | None,
                 baseline: float | None, threshold: float | None, action: str, message: str,
                 evaluation_id: int | None = None) -> int:
    """Store a collapse alarm raised at point ``seq`` (and the policy ``action`` taken); returns its id."""
    with transaction(engine, write=True) as session:
        alarm = AlarmRecord(run_id=run_id, batch_id=_point(session, run_id, seq), evaluation_id=evaluation_id,
                            rule=rule, metric=metric, value=_number(value), baseline=_number(baseline),
                            threshold=_number(threshold), action=action, message=message)
        session.add(alarm)
        session.flush()
        return alarm.id


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
