"""Retraction: a new run that branches from the batch before a wrong fact's batch and goes on without it.

The later batches of the parent were solved on weights that contained the wrong fact, so they cannot be kept
minus one fact: they are *recomputed*. :func:`create_branch` records the branch — a run with the parent's
configuration, its parent, the point it branches from, the retracted fact and the reason — and copies the
parent's history up to that point into it (batches, their facts, deltas with their keys, checkpoints, the
origin; the chain records and hashes unchanged, so the shared prefix verifies to the same chain). The branch's
pool (:func:`db.ledger.branch_condition`) is then the facts of the parent's later batches without the retracted
one, which the ordinary run loop edits (``seqedit retract`` resumes the branch like ``run --resume``). The
parent's history is not touched.
"""

from __future__ import annotations

from sqlalchemy import Engine, insert, select

from db.engine import transaction
from db.errors import BatchStateError
from db.models import BatchFact, BatchRecord, BatchStatus, Checkpoint, RunRecord, RunStatus, WeightDelta
from db.runs import RunInfo, get_run, load_run

COPIED_RUN_COLUMNS = ("model_name", "model_revision", "model_fingerprint", "algorithm", "distribution",
                      "hyperparameters", "batch_size", "eval_every", "checkpoint_every", "collapse_policy",
                      "fact_pool", "fact_source")


def fact_batch(engine: Engine, run_id: int, fact_id: int) -> int:
    """The sequence number of the applied batch of ``run_id`` that edited ``fact_id``."""
    with transaction(engine) as session:
        load_run(session, run_id)
        rows = session.execute(select(BatchRecord.seq, BatchRecord.status)
                               .join(BatchFact, BatchFact.batch_id == BatchRecord.id)
                               .where(BatchRecord.run_id == run_id, BatchFact.fact_id == fact_id)
                               .order_by(BatchRecord.id)).all()
    applied = [seq for seq, status in rows if status == BatchStatus.APPLIED]
    if not applied:
        seen = ", ".join(f"batch {seq} ({status})" for seq, status in rows) or "no batch"
        raise BatchStateError(f"fact {fact_id} is not in run {run_id}'s applied history ({seen}): "
                              f"there is nothing to retract")
    return applied[0]


def create_branch(engine: Engine, run_id: int, fact_id: int, reason: str | None = None) -> RunInfo:
    """Record a branch of ``run_id`` that leaves out ``fact_id`` (see the module docstring); returns it."""
    seq = fact_batch(engine, run_id, fact_id)
    point = seq - 1
    with transaction(engine, write=True) as session:
        parent = load_run(session, run_id)
        branch = RunRecord(**{name: getattr(parent, name) for name in COPIED_RUN_COLUMNS},
                           name=f"run {run_id} without fact {fact_id}", status=RunStatus.CREATED,
                           parent_run_id=run_id, parent_seq=point, retracted_fact_id=fact_id, branch_reason=reason)
        session.add(branch)
        session.flush()
        origin = session.execute(select(Checkpoint.layer, Checkpoint.weights, Checkpoint.sha256)
                                 .where(Checkpoint.run_id == run_id, Checkpoint.batch_id.is_(None))).all()
        session.execute(insert(Checkpoint), [{"run_id": branch.id, "batch_id": None, "layer": layer, "weights": blob,
                                              "sha256": sha} for layer, blob, sha in origin])
        shared = session.scalars(select(BatchRecord).where(
            BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED, BatchRecord.seq <= point)
            .order_by(BatchRecord.seq)).all()
        for batch in shared:
            _copy_batch(session, batch, branch.id)
        session.flush()
        branch_id = branch.id
    return get_run(engine, branch_id)


def _copy_batch(session, batch: BatchRecord, branch_id: int) -> None:
    copy = BatchRecord(run_id=branch_id, seq=batch.seq, status=BatchStatus.APPLIED, n_facts=batch.n_facts,
                       claimed_at=batch.claimed_at, finished_at=batch.finished_at, timings=batch.timings,
                       diagnostics=batch.diagnostics, chain_record=batch.chain_record, chain_sha256=batch.chain_sha256)
    session.add(copy)
    session.flush()
    members = session.execute(select(BatchFact.position, BatchFact.fact_id).where(BatchFact.batch_id == batch.id)).all()
    session.execute(insert(BatchFact), [{"batch_id": copy.id, "position": position, "fact_id": fact}
                                        for position, fact in members])
    deltas = session.execute(select(WeightDelta.layer, WeightDelta.rank, WeightDelta.factors, WeightDelta.sha256_after,
                                    WeightDelta.keys, WeightDelta.keys_sha256)
                             .where(WeightDelta.batch_id == batch.id)).all()
    if deltas:
        session.execute(insert(WeightDelta), [{"batch_id": copy.id, **row._asdict()} for row in deltas])
    checkpoints = session.execute(select(Checkpoint.layer, Checkpoint.weights, Checkpoint.sha256)
                                  .where(Checkpoint.batch_id == batch.id)).all()
    if checkpoints:
        session.execute(insert(Checkpoint), [{"run_id": branch_id, "batch_id": copy.id, **row._asdict()}
                                             for row in checkpoints])


def lineage(engine: Engine, run_id: int) -> list[RunInfo]:
    """The run and its ancestors, the run first."""
    chain = [get_run(engine, run_id)]
    while chain[-1].spec.parent_run_id is not None:
        chain.append(get_run(engine, chain[-1].spec.parent_run_id))
    return chain
