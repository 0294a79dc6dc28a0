"""History queries as pandas DataFrames (one row per fact, batch, metric value or alarm).

These are what reports, plots and Prefect artifacts are made of. Timestamps
come back as timezone-aware UTC; NaN metric values, stored as NULL, come back
as NaN.
"""

from __future__ import annotations

import pandas as pd
from sqlalchemy import Engine, Enum, Integer, Select, func, select
from sqlalchemy.orm import Session

from db.models import (ACTIVE_BATCH_STATUSES, AlarmRecord, BatchStatus, BatchFact, BatchRecord, EvaluationRecord, EvaluationStatus, FactRecord,
                       MetricRecord, RollbackRecord, RunRecord, UTCDateTime)
from db.ledger import available_facts, pool_condition
from db.runs import get_run
from editing.facts import Fact

TIMING_PREFIX = "seconds_"
"""``batches_frame`` spreads each batch's timings over columns ``seconds_<phase>``."""
MEMORIZATION_PREFIX = "memorization_"
"""... and the memorization its edit achieved over columns ``memorization_<layer>``."""


def _frame(engine: Engine, query: Select) -> pd.DataFrame:
    """Run ``query``; statuses become strings, timestamps UTC datetimes, integers nullable Int64."""
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    frame = pd.DataFrame(rows, columns=list(query.selected_columns.keys()))
    for column in query.selected_columns:
        if isinstance(column.type, UTCDateTime):
            frame[column.key] = pd.to_datetime(frame[column.key], utc=True)
        elif isinstance(column.type, Integer):
            frame[column.key] = frame[column.key].astype("Int64")  # ids may be NULL: keep them integers
        elif isinstance(column.type, Enum):
            frame[column.key] = frame[column.key].map(lambda value: None if value is None else str(value))
    return frame


def runs_frame(engine: Engine) -> pd.DataFrame:
    """Every run with its model, algorithm, batch size and status."""
    columns = [RunRecord.id.label("run_id"), RunRecord.name, RunRecord.model_name, RunRecord.algorithm,
               RunRecord.distribution, RunRecord.batch_size, RunRecord.eval_every, RunRecord.checkpoint_every,
               RunRecord.status, RunRecord.created_at, RunRecord.updated_at]
    return _frame(engine, select(*columns).order_by(RunRecord.id))


def facts_frame(engine: Engine, source: str | None = None, status: str | None = None) -> pd.DataFrame:
    """Ingested records (without raw bytes), optionally of one source and/or status, by id."""
    columns = [FactRecord.id.label("fact_id"), FactRecord.source, FactRecord.source_index, FactRecord.location,
               FactRecord.status, FactRecord.subject, FactRecord.prompt, FactRecord.target_new,
               FactRecord.target_true, FactRecord.relation_id, FactRecord.case_id, FactRecord.duplicate_of,
               FactRecord.rejection_reason, FactRecord.rejection_field, FactRecord.rejection_detail]
    query = select(*columns).order_by(FactRecord.id)
    if source is not None:
        query = query.where(FactRecord.source == source)
    if status is not None:
        query = query.where(FactRecord.status == status)
    return _frame(engine, query)


def batches_frame(engine: Engine, run_id: int) -> pd.DataFrame:
    """Every batch of a run, rolled back and failed ones included, in claim order, with timings and
    the memorization per layer (batches recorded before ledgers kept it have none)."""
    query = (select(BatchRecord.id.label("batch_id"), BatchRecord.seq, BatchRecord.status, BatchRecord.n_facts,
                    BatchRecord.claimed_at, BatchRecord.finished_at, BatchRecord.error,
                    RollbackRecord.created_at.label("rolled_back_at"), RollbackRecord.to_seq.label("rolled_back_to"),
                    BatchRecord.timings, BatchRecord.diagnostics)
             .outerjoin(RollbackRecord, BatchRecord.rollback_id == RollbackRecord.id)
             .where(BatchRecord.run_id == run_id).order_by(BatchRecord.id))
    frame = _frame(engine, query)
    frame["duration_s"] = (frame["finished_at"] - frame["claimed_at"]).dt.total_seconds()
    timings = pd.DataFrame([row or {} for row in frame.pop("timings")], index=frame.index)
    memorization = pd.DataFrame([(row or {}).get("memorization", {}) for row in frame.pop("diagnostics")],
                                index=frame.index)
    return frame.join(timings.add_prefix(TIMING_PREFIX)).join(memorization.add_prefix(MEMORIZATION_PREFIX))


def metrics_frame(engine: Engine, run_id: int, include_rolled_back: bool = False,
                  kind: str | None = None) -> pd.DataFrame:
    """A run's metric values in long format: (seq, name, split, value, kind), by seq then evaluation;
    ``kind`` keeps only ``full`` evaluations or only ``health`` checks."""
    seq = func.coalesce(BatchRecord.seq, 0).label("seq")
    query = (select(EvaluationRecord.run_id, EvaluationRecord.id.label("evaluation_id"), seq, MetricRecord.name,
                    MetricRecord.split, MetricRecord.value, EvaluationRecord.status, EvaluationRecord.created_at,
                    EvaluationRecord.kind)
             .join(MetricRecord, MetricRecord.evaluation_id == EvaluationRecord.id)
             .outerjoin(BatchRecord, EvaluationRecord.batch_id == BatchRecord.id)
             .where(EvaluationRecord.run_id == run_id)
             .order_by(seq, EvaluationRecord.id, MetricRecord.id))
    if not include_rolled_back:
        query = query.where(EvaluationRecord.status == EvaluationStatus.ACTIVE)
    if kind is not None:
        query = query.where(EvaluationRecord.kind == kind)
    frame = _frame(engine, query)
    frame["value"] = frame["value"].astype(float)
    return frame


def evaluations_frame(engine: Engine, run_id: int, include_rolled_back: bool = False) -> pd.DataFrame:
    """A run's evaluations (one row each): where in the history, how long they took, their status."""
    seq = func.coalesce(BatchRecord.seq, 0).label("seq")
    query = (select(EvaluationRecord.id.label("evaluation_id"), seq, EvaluationRecord.status,
                    EvaluationRecord.duration_s, EvaluationRecord.created_at, EvaluationRecord.kind)
             .outerjoin(BatchRecord, EvaluationRecord.batch_id == BatchRecord.id)
             .where(EvaluationRecord.run_id == run_id).order_by(seq, EvaluationRecord.id))
    if not include_rolled_back:
        query = query.where(EvaluationRecord.status == EvaluationStatus.ACTIVE)
    frame = _frame(engine, query)
    frame["duration_s"] = frame["duration_s"].astype(float)
    return frame


def alarms_frame(engine: Engine, run_id: int) -> pd.DataFrame:
    """Every collapse alarm of a run, in the order raised."""
    seq = func.coalesce(BatchRecord.seq, 0).label("seq")
    query = (select(AlarmRecord.id.label("alarm_id"), seq, AlarmRecord.batch_id, AlarmRecord.evaluation_id,
                    AlarmRecord.rule, AlarmRecord.metric, AlarmRecord.value, AlarmRecord.baseline,
                    AlarmRecord.threshold, AlarmRecord.action, AlarmRecord.message, AlarmRecord.created_at)
             .outerjoin(BatchRecord, AlarmRecord.batch_id == BatchRecord.id)
             .where(AlarmRecord.run_id == run_id).order_by(AlarmRecord.id))
    return _frame(engine, query)


def run_facts_frame(engine: Engine, run_id: int) -> pd.DataFrame:
    """Every fact the run's batches took (rolled-back and failed batches included), batch by batch."""
    query = (select(BatchRecord.seq, BatchRecord.id.label("batch_id"), BatchRecord.status.label("batch_status"),
                    BatchFact.position, FactRecord.id.label("fact_id"), FactRecord.source, FactRecord.location,
                    FactRecord.case_id, FactRecord.subject, FactRecord.prompt, FactRecord.target_new,
                    FactRecord.target_true, FactRecord.status.label("fact_status"))
             .join(BatchFact, BatchFact.batch_id == BatchRecord.id)
             .join(FactRecord, BatchFact.fact_id == FactRecord.id)
             .where(BatchRecord.run_id == run_id).order_by(BatchRecord.id, BatchFact.position))
    return _frame(engine, query)


def edits_for_subject(engine: Engine, subject: str) -> pd.DataFrame:
    """Every batch, of any run, that took a fact whose subject contains ``subject`` (case-insensitive), oldest first."""
    query = (select(FactRecord.id.label("fact_id"), FactRecord.subject, FactRecord.prompt, FactRecord.target_new,
                    FactRecord.target_true, FactRecord.source, FactRecord.status.label("fact_status"),
                    BatchRecord.run_id, BatchRecord.id.label("batch_id"), BatchRecord.seq,
                    BatchRecord.status.label("batch_status"), BatchRecord.claimed_at, BatchRecord.finished_at)
             .join(BatchFact, BatchFact.fact_id == FactRecord.id)
             .join(BatchRecord, BatchFact.batch_id == BatchRecord.id)
             .where(func.lower(FactRecord.subject).contains(subject.lower(), autoescape=True))
             .order_by(BatchRecord.claimed_at, BatchRecord.id, BatchFact.position))
    return _frame(engine, query)


def applied_facts(engine: Engine, run_id: int, before_seq: int | None = None) -> list[tuple[int, Fact]]:
    """(fact id, fact) of every fact in the run's current history (applied batches), in edit order;
    with ``before_seq``, only those of batches ``1 .. before_seq − 1`` (the edits made before that batch)."""
    query = (select(FactRecord).join(BatchFact, BatchFact.fact_id == FactRecord.id)
             .join(BatchRecord, BatchFact.batch_id == BatchRecord.id)
             .where(BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED)
             .order_by(BatchRecord.seq, BatchFact.position))
    if before_seq is not None:
        query = query.where(BatchRecord.seq < before_seq)
    with Session(engine) as session:
        return [(row.id, row.to_fact()) for row in session.scalars(query)]


def applied_count(engine: Engine, run_id: int) -> int:
    """How many facts the run's current history (its applied batches) holds."""
    with engine.connect() as connection:
        return int(connection.execute(select(func.coalesce(func.sum(BatchRecord.n_facts), 0)).where(
            BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED)).scalar_one())


def batch_facts(engine: Engine, run_id: int, seq: int) -> list[Fact]:
    """The facts of the run's active batch ``seq``, in claim order (empty for 0, the baseline)."""
    query = (select(FactRecord).join(BatchFact, BatchFact.fact_id == FactRecord.id)
             .join(BatchRecord, BatchFact.batch_id == BatchRecord.id)
             .where(BatchRecord.run_id == run_id, BatchRecord.seq == seq,
                    BatchRecord.status.in_(ACTIVE_BATCH_STATUSES))
             .order_by(BatchFact.position))
    with Session(engine) as session:
        return [row.to_fact() for row in session.scalars(query)]


def pending_count(engine: Engine, run_id: int) -> int:
    """How many facts the run could still claim (its pool, see :func:`db.ledger.available_facts`)."""
    run = get_run(engine, run_id)
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(FactRecord)
                                      .where(available_facts(run))).scalar_one())


def has_batch_in_progress(engine: Engine, run_id: int) -> bool:
    """Whether the run has a claimed, uncommitted batch."""
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(BatchRecord).where(
            BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.IN_PROGRESS)).scalar_one() > 0


def claimable_count(engine: Engine, fact_pool: str, fact_source: str | None) -> int:
    """How many facts a new run on ``fact_pool`` / ``fact_source`` could claim (nothing is created)."""
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(FactRecord)
                                      .where(pool_condition(fact_pool, fact_source))).scalar_one())
