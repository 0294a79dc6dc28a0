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
    """Every run with its model, algorithm, batch size, status and lineage (a branch's parent, the point it
    branches from, the fact it retracts and why)."""
    columns = [RunRecord.id.label("run_id"), RunRecord.name, RunRecord.model_name, RunRecord.algorithm,
               RunRecord.distribution, RunRecord.batch_size, RunRecord.eval_every, RunRecord.checkpoint_every,
               RunRecord.status, RunRecord.parent_run_id, RunRecord.parent_seq, RunRecord.retracted_fact_id,
               RunRecord.branch_reason, RunRecord.created_at, RunRecord.updated_at]
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


def subject_timeline(engine: Engine, subject: str) -> pd.DataFrame:
    """Every fact whose subject contains ``subject`` (any case), across runs, oldest first: one row per batch that
    took it (and one for a fact no batch took), with its status in that run — ``applied``, ``rolled back``,
    ``retracted`` (a branch of the run leaves it out), ``superseded`` (a later fact corrects it), ``failed``,
    or the fact's own status when no batch took it — and the evaluation of that run nearest after the batch:
    its point, the ES of the batch it evaluated and the retention ES of earlier edits."""
    edits = edits_for_subject(engine, subject)
    facts = _frame(engine, select(FactRecord.id.label("fact_id"), FactRecord.subject, FactRecord.prompt,
                                  FactRecord.target_new, FactRecord.target_true, FactRecord.source,
                                  FactRecord.status.label("fact_status"), FactRecord.superseded_by)
                   .where(func.lower(FactRecord.subject).contains(subject.lower(), autoescape=True),
                          FactRecord.identity_key.is_not(None))
                   .order_by(FactRecord.id))
    superseded = dict(zip(facts["fact_id"], facts["superseded_by"]))
    never = facts[~facts["fact_id"].isin(edits["fact_id"])].drop(columns="superseded_by")
    branches = _frame(engine, select(RunRecord.id.label("branch_run_id"), RunRecord.parent_run_id,
                                     RunRecord.retracted_fact_id).where(RunRecord.parent_run_id.is_not(None)))
    retracted = {(int(row.parent_run_id), int(row.retracted_fact_id)): int(row.branch_run_id)
                 for row in branches.itertuples()}
    runs = edits["run_id"].dropna().unique()
    active = {run_id: _headline_by_point(engine, int(run_id), include_rolled_back=False) for run_id in runs}
    every = {run_id: _headline_by_point(engine, int(run_id), include_rolled_back=True) for run_id in runs}

    def status(row) -> str:
        if row.batch_status != BatchStatus.APPLIED:
            return str(row.batch_status).replace("_", " ")
        if (row.run_id, row.fact_id) in retracted:
            return f"retracted (branch run {retracted[(row.run_id, row.fact_id)]})"
        if not pd.isna(superseded.get(row.fact_id)):
            return f"superseded by fact {superseded[row.fact_id]}"
        return "applied"

    rows = []
    for row in edits.itertuples():
        # an applied edit is judged by the history that stands; a rolled-back one by what was measured before it went
        point = (active if row.batch_status == BatchStatus.APPLIED else every)[row.run_id]
        after = point[point["seq"] >= row.seq].head(1)
        rows.append({"fact_id": row.fact_id, "subject": row.subject, "prompt": row.prompt,
                     "target_new": row.target_new, "target_true": row.target_true, "run_id": row.run_id,
                     "seq": row.seq, "time": row.finished_at, "status": status(row),
                     "eval_seq": after["seq"].iloc[0] if len(after) else pd.NA,
                     "eval_es": after["es"].iloc[0] if len(after) else float("nan"),
                     "eval_retention_es": after["retention.es"].iloc[0] if len(after) else float("nan")})
    for row in never.itertuples():
        label = (f"superseded by fact {superseded[row.fact_id]}" if not pd.isna(superseded.get(row.fact_id))
                 else str(row.fact_status))
        rows.append({"fact_id": row.fact_id, "subject": row.subject, "prompt": row.prompt,
                     "target_new": row.target_new, "target_true": row.target_true, "run_id": pd.NA, "seq": pd.NA,
                     "time": pd.NaT, "status": label, "eval_seq": pd.NA, "eval_es": float("nan"),
                     "eval_retention_es": float("nan")})
    columns = ["fact_id", "subject", "prompt", "target_new", "target_true", "run_id", "seq", "time", "status",
               "eval_seq", "eval_es", "eval_retention_es"]
    return pd.DataFrame(rows, columns=columns)


def _headline_by_point(engine: Engine, run_id: int, include_rolled_back: bool) -> pd.DataFrame:
    """(seq, es, retention.es) of a run's full evaluations by point."""
    frame = metrics_frame(engine, run_id, include_rolled_back=include_rolled_back, kind="full")
    wide = (frame.pivot_table(index="seq", columns="name", values="value", aggfunc="last")
            if not frame.empty else pd.DataFrame(index=pd.Index([], name="seq")))
    for name in ("es", "retention.es"):
        if name not in wide:
            wide[name] = float("nan")
    return wide[["es", "retention.es"]].reset_index().sort_values("seq")


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
