"""The ledger's hash chain: each committed batch sealed over the previous one, each evaluation over its batch.

A batch's *chain record* is a plain JSON object of what the batch did, read back from the rows it wrote:

* ``previous`` — the chain hash of the applied batch before it (None for batch 1), which links the history;
* ``facts`` — every fact it edited, in claim order, with the content that decides the edit (subject,
  prompt, targets, the other prompts, and the source record it came from);
* ``layers`` — per changed layer, the sha256 of the stored delta and keys and the layer's sha256 after it;
* for batch 1 only, the run's configuration and the sha256 of each original layer (the origin).

Its *chain hash* is the sha256 of the record's canonical encoding (sorted keys, no spaces, UTF-8), so changing
any of those rows after the commit — or the record itself — no longer matches, and because every batch hashes
the previous batch's hash, neither does anything after it. An evaluation's *seal* is the same for its metrics
and alarms, bound to the chain hash of the batch it scored; evaluations are sealed one by one rather than chained
to each other, because asynchronous workers record them in any order.

Everything here reads named columns with Core queries (no ORM entities), so that the migration that seals
existing ledgers (``alembic/versions/0008``) computes exactly what a commit computes today.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import (AlarmRecord, BatchFact, BatchRecord, BatchStatus, Checkpoint, EvaluationRecord,
                       FactRecord, MetricRecord, RunRecord, WeightDelta)

FACT_CONTENT = ("subject", "prompt", "target_new", "target_true", "relation_id", "case_id", "paraphrase_prompts",
                "neighborhood_prompts", "generation_prompts", "neighborhood_answer", "source", "source_index",
                "record_sha256")
"""The columns of a fact the chain seals: everything the edit read, and where the record came from. Spelled
out (not derived from :class:`editing.facts.Fact`) so that revision 0008 seals with the columns it knows; a
test checks that every field of ``Fact`` is here."""

RUN_CONFIGURATION = ("model_name", "model_revision", "model_fingerprint", "algorithm", "distribution",
                     "hyperparameters", "batch_size", "eval_every", "checkpoint_every", "collapse_policy",
                     "fact_pool", "fact_source")
"""The columns of a run that define what its edits were (not its name, status or lineage)."""


def canonical(record: Any) -> bytes:
    """The one byte encoding that is hashed: JSON with sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def seal(record: Any) -> str:
    """sha256 of :func:`canonical` ``(record)``."""
    return hashlib.sha256(canonical(record)).hexdigest()


def blob_sha256(blob: bytes | None) -> str | None:
    return None if blob is None else hashlib.sha256(bytes(blob)).hexdigest()


def configuration_run(session: Session, run_id: int) -> int:
    """The run whose configuration batch 1 of ``run_id`` was sealed with: a branch's root ancestor (a branch
    copies its parent's first batches, seals and all)."""
    while True:
        parent = session.scalar(select(RunRecord.parent_run_id).where(RunRecord.id == run_id))
        if parent is None:
            return run_id
        run_id = parent


def run_configuration(session: Session, run_id: int) -> dict[str, Any]:
    columns = [getattr(RunRecord, name) for name in RUN_CONFIGURATION]
    row = session.execute(select(*columns).where(RunRecord.id == run_id)).one()
    return dict(zip(RUN_CONFIGURATION, row))


def origin_hashes(session: Session, run_id: int) -> dict[str, str]:
    rows = session.execute(select(Checkpoint.layer, Checkpoint.sha256)
                           .where(Checkpoint.run_id == run_id, Checkpoint.batch_id.is_(None))).tuples()
    return {str(layer): sha for layer, sha in rows}


def previous_chain(session: Session, run_id: int, seq: int) -> str | None:
    """The chain hash of applied batch ``seq - 1`` of the run (None before batch 1)."""
    if seq <= 1:
        return None
    return session.scalar(select(BatchRecord.chain_sha256).where(
        BatchRecord.run_id == run_id, BatchRecord.seq == seq - 1, BatchRecord.status == BatchStatus.APPLIED))


def batch_record(session: Session, batch_id: int, previous: str | None) -> dict[str, Any]:
    """The chain record of batch ``batch_id`` from the ledger's rows as they are now, linked to ``previous``."""
    run_id, seq = session.execute(select(BatchRecord.run_id, BatchRecord.seq)
                                  .where(BatchRecord.id == batch_id)).one()
    content = [getattr(FactRecord, name) for name in FACT_CONTENT]
    facts = [{"id": row[0], **dict(zip(FACT_CONTENT, row[1:]))} for row in session.execute(
        select(FactRecord.id, *content).join(BatchFact, BatchFact.fact_id == FactRecord.id)
        .where(BatchFact.batch_id == batch_id).order_by(BatchFact.position))]
    layers = {str(layer): {"rank": rank, "factors_sha256": blob_sha256(factors), "keys_sha256": keys_sha256,
                           "keys_blob_sha256": blob_sha256(keys), "sha256_after": after}
              for layer, rank, factors, keys, keys_sha256, after in session.execute(
                  select(WeightDelta.layer, WeightDelta.rank, WeightDelta.factors, WeightDelta.keys,
                         WeightDelta.keys_sha256, WeightDelta.sha256_after)
                  .where(WeightDelta.batch_id == batch_id).order_by(WeightDelta.layer))}
    record: dict[str, Any] = {"seq": seq, "previous": previous, "facts": facts, "layers": layers}
    if seq == 1:
        record["run_configuration"] = run_configuration(session, configuration_run(session, run_id))
        record["origin"] = origin_hashes(session, run_id)
    return record


def seal_batch(session: Session, batch_id: int) -> str:
    """Compute and store the chain record and hash of a batch being committed (inside its transaction)."""
    run_id, seq = session.execute(select(BatchRecord.run_id, BatchRecord.seq)
                                  .where(BatchRecord.id == batch_id)).one()
    record = batch_record(session, batch_id, previous_chain(session, run_id, seq))
    digest = seal(record)
    session.execute(BatchRecord.__table__.update().where(BatchRecord.id == batch_id)
                    .values(chain_record=record, chain_sha256=digest))
    return digest


def evaluation_record(session: Session, evaluation_id: int) -> dict[str, Any]:
    """The seal record of an evaluation from its rows as they are now: its point, metrics and alarms."""
    batch_id, kind = session.execute(select(EvaluationRecord.batch_id, EvaluationRecord.kind)
                                     .where(EvaluationRecord.id == evaluation_id)).one()
    batch_chain, seq = (None, 0) if batch_id is None else session.execute(
        select(BatchRecord.chain_sha256, BatchRecord.seq).where(BatchRecord.id == batch_id)).one()
    metrics = [list(row) for row in session.execute(
        select(MetricRecord.name, MetricRecord.split, MetricRecord.value)
        .where(MetricRecord.evaluation_id == evaluation_id).order_by(MetricRecord.name, MetricRecord.split))]
    alarms = [list(row) for row in session.execute(
        select(AlarmRecord.rule, AlarmRecord.metric, AlarmRecord.value, AlarmRecord.baseline, AlarmRecord.threshold,
               AlarmRecord.action, AlarmRecord.message)
        .where(AlarmRecord.evaluation_id == evaluation_id).order_by(AlarmRecord.id))]
    return {"seq": seq, "batch_chain": batch_chain, "kind": kind, "metrics": metrics, "alarms": alarms}


def seal_evaluation(session: Session, evaluation_id: int) -> str:
    """Compute and store the seal of an evaluation being recorded (inside its transaction)."""
    record = evaluation_record(session, evaluation_id)
    digest = seal(record)
    session.execute(EvaluationRecord.__table__.update().where(EvaluationRecord.id == evaluation_id)
                    .values(seal_record=record, seal_sha256=digest))
    return digest


def seal_existing(session: Session) -> tuple[int, int]:
    """Seal every committed batch (in each run's order) and every evaluation that has no seal yet: what the
    migration does for a ledger written before the chain existed. Returns (batches, evaluations) sealed."""
    committed = session.execute(
        select(BatchRecord.id).where(BatchRecord.chain_sha256.is_(None), BatchRecord.finished_at.is_not(None),
                                     BatchRecord.status.in_((BatchStatus.APPLIED, BatchStatus.ROLLED_BACK)))
        .order_by(BatchRecord.run_id, BatchRecord.seq, BatchRecord.id)).scalars().all()
    for batch_id in committed:
        seal_batch(session, batch_id)
    evaluations = session.scalars(select(EvaluationRecord.id).where(EvaluationRecord.seal_sha256.is_(None))
                                  .order_by(EvaluationRecord.id)).all()
    for evaluation_id in evaluations:
        seal_evaluation(session, evaluation_id)
    return len(committed), len(evaluations)
