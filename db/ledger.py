"""Writing a run's history: claim a batch, commit or fail it, roll back — under the run's writer lock.

Every change to a run's ledger goes through a :class:`RunWriter`, which only
:func:`acquire_writer` hands out, so "one writer per run" holds by
construction (and a second writer gets :class:`RunLockedError`). The database
enforces it as well: at most one ``in_progress`` batch per run and one active
batch per sequence number (partial unique indexes, see :mod:`db.models`).

The life of a batch, as the sequential-editing flow drives it::

    with acquire_writer(engine, run_id) as writer:
        model.restore(weights_at(engine, run_id, last_applied_seq(engine, run_id)))  # on resume
        batch = writer.in_progress_batch() or writer.claim_batch()   # redo a crashed batch, else take new facts
        ...compute the edit (minutes)...
        writer.commit_batch(batch, deltas, layer_sha256, timings, checkpoint)  # or writer.fail_batch(...)

* :meth:`RunWriter.claim_batch` takes the next pending facts in fact-id order,
  creates the batch (``in_progress``) and marks the facts ``claimed`` in one
  transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
  SQLite), so two runs drawing from the same pool never get the same fact.
* If the process dies before committing, the batch stays ``in_progress`` with
  its facts attached; :meth:`RunWriter.in_progress_batch` returns it, same
  facts, same order, to be redone.
* :meth:`RunWriter.commit_batch` writes the deltas, the batch's status and
  timings, the facts' status and any checkpoint in one transaction.
* :meth:`RunWriter.fail_batch` marks the batch ``failed`` and returns its facts
  to the pool; the run's weights and ledger are as before the claim.
* :meth:`RunWriter.rollback` restores the weights after batch ``n`` and marks
  every later batch (and its evaluations) rolled back; the next claim is
  batch ``n + 1`` again.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from sqlalchemy import ColumnElement, Engine, and_, insert, select, update
from sqlalchemy.orm import Session

from db.chain import seal_batch
from db.engine import transaction
from db.errors import BatchStateError, LedgerError, LedgerIntegrityError, RunLockedError
from db.locks import writer_lock
from db.models import (ACTIVE_BATCH_STATUSES, EDITABLE_FACT_STATUSES, BatchFact, BatchRecord, BatchStatus,
                       Checkpoint, EvaluationRecord, EvaluationStatus, FactRecord, FactStatus, RollbackRecord,
                       WeightDelta, utcnow)
from db.replay import applied_head, expected_hashes, weights_at
from db.runs import RunInfo, get_run
from db.tensors import delta_to_bytes, keys_to_bytes, weight_to_bytes
from editing.delta import LowRankDelta, weight_sha256
from editing.facts import Fact


@dataclass(frozen=True)
class ClaimedBatch:
    """An ``in_progress`` batch and its facts, in claim order."""

    id: int
    run_id: int
    seq: int
    fact_ids: tuple[int, ...]
    facts: tuple[Fact, ...]
    checkpoint_due: bool
    """True when the run's ``checkpoint_every`` asks for a checkpoint with this batch's commit."""


def available_facts(run: RunInfo) -> ColumnElement[bool]:
    """The condition on ``facts`` rows that ``run`` may claim next (see :meth:`RunWriter.claim_batch`)."""
    if run.spec.parent_run_id is not None:
        return branch_condition(run)
    return pool_condition(run.spec.fact_pool, run.spec.fact_source, run.id)


def branch_condition(run: RunInfo) -> ColumnElement[bool]:
    """A branch's pool: the facts of its parent's batches after ``parent_seq`` that were applied when the branch
    was made, without the retracted fact and without those the branch has edited already — in fact-id order,
    the order the parent claimed them in."""
    later = (select(BatchFact.fact_id).join(BatchRecord, BatchFact.batch_id == BatchRecord.id)
             .where(BatchRecord.run_id == run.spec.parent_run_id, BatchRecord.status == BatchStatus.APPLIED,
                    BatchRecord.seq > run.spec.parent_seq, BatchRecord.finished_at <= run.created_at))
    in_history = (select(BatchFact.fact_id).join(BatchRecord, BatchFact.batch_id == BatchRecord.id)
                  .where(BatchRecord.run_id == run.id, BatchRecord.status.in_(ACTIVE_BATCH_STATUSES)))
    return and_(FactRecord.id.in_(later), FactRecord.id != run.spec.retracted_fact_id,
                FactRecord.id.not_in(in_history))


def pool_condition(fact_pool: str, fact_source: str | None, run_id: int | None = None) -> ColumnElement[bool]:
    """The facts a run on ``fact_pool`` / ``fact_source`` may claim; ``run_id`` None is a run not yet
    created (a private pool then has no history to exclude), so a command can say "nothing to edit"
    before it creates anything."""
    if fact_pool == "private":
        condition = and_(FactRecord.source == fact_source, FactRecord.status.in_(EDITABLE_FACT_STATUSES))
        if run_id is None:
            return condition
        in_history = (select(BatchFact.fact_id).join(BatchRecord, BatchFact.batch_id == BatchRecord.id)
                      .where(BatchRecord.run_id == run_id, BatchRecord.status.in_(ACTIVE_BATCH_STATUSES)))
        return and_(condition, FactRecord.id.not_in(in_history))
    condition = FactRecord.status == FactStatus.PENDING
    return condition if fact_source is None else and_(condition, FactRecord.source == fact_source)


def release_abandoned_claims(engine: Engine, except_run: int | None = None) -> list[tuple[int, int]]:
    """Return to the pool the facts of batches left ``in_progress`` by runs that no process is writing.

    A run that dies without unwinding (SIGKILL, a lost machine) cannot give its claimed batch back; its
    facts would stay ``claimed`` for good and no other run on the pool would edit them. Whether a run is
    still being written is exactly whether its writer lock is held, so each such run's lock is tried: if
    it can be taken, nobody is writing the run, its batch is marked failed and its facts go back to
    ``pending`` (a later ``--resume`` of that run simply claims again). Returns (run id, batch seq) of
    every batch released.
    """
    with transaction(engine) as session:
        stranded = session.execute(select(BatchRecord.run_id, BatchRecord.seq)
                                   .where(BatchRecord.status == BatchStatus.IN_PROGRESS)).all()
    released = []
    for run_id, seq in stranded:
        if run_id == except_run:
            continue
        try:
            with acquire_writer(engine, run_id) as writer:
                batch = writer.in_progress_batch()
                if batch is not None:
                    writer.fail_batch(batch, "abandoned: its run ended without committing it; "
                                             "facts returned to the pool")
                    released.append((run_id, seq))
        except RunLockedError:
            continue  # a live writer holds it
    return released


@contextmanager
def acquire_writer(engine: Engine, run_id: int) -> Iterator["RunWriter"]:
    """The run's writer for the duration of the block; :class:`RunLockedError` if another one exists."""
    run = get_run(engine, run_id)
    lock = writer_lock(engine, run_id)
    lock.acquire()
    writer = RunWriter(engine, run)
    try:
        yield writer
    finally:
        writer._open = False
        lock.release()


class RunWriter:
    """Write access to one run's ledger; valid only inside :func:`acquire_writer`'s block."""

    def __init__(self, engine: Engine, run: RunInfo) -> None:
        self.engine = engine
        self.run = run
        self._open = True

    def claim_batch(self, batch_size: int | None = None) -> ClaimedBatch | None:
        """Claim the run's next ``batch_size`` (default: the run's) facts, or None if none are left.

        A ``shared`` run takes pending facts (of its source, if it has one) and
        marks them claimed; a ``private`` run takes the valid facts of its
        source that are not in its current history, leaving their status alone.
        Both go in fact-id order, so a history replayed after a rollback takes
        the same facts again.
        """
        self._check_open()
        size = self.run.spec.batch_size if batch_size is None else batch_size
        if size < 1:
            raise ValueError(f"a batch holds at least one fact, asked for {size}")
        with transaction(self.engine, write=True) as session:
            current = self._in_progress_row(session)
            if current is not None:
                raise BatchStateError(f"run {self.run.id} already has batch {current.seq} in progress: "
                                      f"redo it (in_progress_batch) or fail it before claiming another")
            query = select(FactRecord).where(available_facts(self.run)).order_by(FactRecord.id).limit(size)
            if not self.private:
                query = query.with_for_update(skip_locked=True)
            rows = session.scalars(query).all()
            if not rows:
                return None
            seq = applied_head(session, self.run.id) + 1
            batch = BatchRecord(run_id=self.run.id, seq=seq, status=BatchStatus.IN_PROGRESS, n_facts=len(rows))
            session.add(batch)
            session.flush()
            ids = [row.id for row in rows]
            if not self.private:
                claimed = session.execute(
                    update(FactRecord).where(FactRecord.id.in_(ids), FactRecord.status == FactStatus.PENDING)
                    .values(status=FactStatus.CLAIMED).execution_options(synchronize_session=False)).rowcount
                if claimed != len(ids):
                    raise BatchStateError(f"{len(ids) - claimed} facts were taken by someone else while claiming")
            session.execute(insert(BatchFact), [{"batch_id": batch.id, "position": position, "fact_id": fact_id}
                                                for position, fact_id in enumerate(ids)])
            return self._claimed(batch, rows)

    @property
    def private(self) -> bool:
        """A private pool or a branch: the facts' global status is not this run's to change."""
        return self.run.spec.fact_pool == "private" or self.run.spec.parent_run_id is not None

    def in_progress_batch(self) -> ClaimedBatch | None:
        """The batch claimed but never committed or failed (a crash), with the same facts; else None."""
        self._check_open()
        with transaction(self.engine) as session:
            batch = self._in_progress_row(session)
            if batch is None:
                return None
            rows = session.scalars(select(FactRecord).join(BatchFact, BatchFact.fact_id == FactRecord.id)
                                   .where(BatchFact.batch_id == batch.id).order_by(BatchFact.position)).all()
            return self._claimed(batch, rows)

    def commit_batch(self, batch: ClaimedBatch, deltas: Mapping[int, LowRankDelta], layer_sha256: Mapping[int, str],
                     timings: Mapping[str, float] | None = None,
                     checkpoint: Mapping[int, torch.Tensor] | None = None,
                     diagnostics: Mapping[str, Any] | None = None,
                     keys: Mapping[int, torch.Tensor] | None = None) -> None:
        """Record ``batch`` as applied, in one transaction.

        ``deltas`` and ``layer_sha256`` (the :func:`weight_sha256` of each layer
        after applying its delta) cover the layers this batch changed.
        ``checkpoint``, the weights of *every* edited layer after the batch, is
        required when ``batch.checkpoint_due`` and allowed at any batch; it is
        verified against the hashes the ledger implies before it is stored.
        ``diagnostics`` (JSON) records what the edit achieved, e.g. the memorization per layer;
        ``keys`` (layer → ``K_E``, d_in × B) the keys each layer was solved for, from which the
        run's edit memory is rebuilt (:func:`db.replay.edit_memory_at`).
        """
        self._check_batch(batch)
        if set(deltas) != set(layer_sha256):
            raise ValueError(f"deltas for layers {sorted(deltas)} but hashes for {sorted(layer_sha256)}")
        unknown = set(deltas) - set(self.run.layers)
        if unknown:
            raise ValueError(f"layers {sorted(unknown)} are not edited by run {self.run.id} ({self.run.layers})")
        if checkpoint is None and batch.checkpoint_due:
            raise ValueError(f"batch {batch.seq} is due a checkpoint (every {self.run.spec.checkpoint_every} "
                             f"batches): pass the weights of layers {self.run.layers}")
        if checkpoint is not None and set(checkpoint) != set(self.run.layers):
            raise ValueError(f"a checkpoint holds every edited layer {self.run.layers}, got {sorted(checkpoint)}")
        if keys is not None and set(keys) != set(deltas):
            raise ValueError(f"keys for layers {sorted(keys)} but deltas for {sorted(deltas)}")
        stored_keys = {layer: keys_to_bytes(k) for layer, k in (keys or {}).items()}
        delta_rows = [{"batch_id": batch.id, "layer": layer, "rank": delta.rank, "factors": delta_to_bytes(delta),
                       "sha256_after": layer_sha256[layer],
                       "keys": stored_keys[layer][0] if layer in stored_keys else None,
                       "keys_sha256": stored_keys[layer][1] if layer in stored_keys else None}
                      for layer, delta in sorted(deltas.items())]
        snapshot = {layer: (weight_to_bytes(weight), weight_sha256(weight))
                    for layer, weight in (checkpoint or {}).items()}
        with transaction(self.engine, write=True) as session:
            self._finish(session, batch, BatchStatus.APPLIED, timings=dict(timings) if timings else None,
                         diagnostics=dict(diagnostics) if diagnostics else None)
            if delta_rows:
                session.execute(insert(WeightDelta), delta_rows)
            if not self.private:
                self._set_fact_status(session, [batch.id], FactStatus.APPLIED, (FactStatus.CLAIMED,))
            if snapshot:
                self._store_checkpoint(session, batch, snapshot)
            seal_batch(session, batch.id)

    def fail_batch(self, batch: ClaimedBatch, error: str) -> None:
        """Mark ``batch`` failed (with ``error``) and return its facts to the pending pool."""
        self._check_batch(batch)
        with transaction(self.engine, write=True) as session:
            self._finish(session, batch, BatchStatus.FAILED, error=error)
            if not self.private:
                self._set_fact_status(session, [batch.id], FactStatus.PENDING, (FactStatus.CLAIMED,))

    def rollback(self, seq: int, restore_facts: bool = True, reason: str | None = None) -> dict[int, torch.Tensor]:
        """Return the verified weights after batch ``seq`` and mark every later batch rolled back.

        Later batches (applied or in progress) and their evaluations keep their
        rows with status ``rolled_back``; their facts go back to ``pending``
        (``restore_facts=True``) or become ``rolled_back``. The next claim is
        batch ``seq + 1``.
        """
        self._check_open()
        weights = weights_at(self.engine, self.run.id, seq)
        with transaction(self.engine, write=True) as session:
            record = RollbackRecord(run_id=self.run.id, to_seq=seq, restore_facts=restore_facts, reason=reason)
            session.add(record)
            session.flush()
            later = session.scalars(select(BatchRecord.id).where(
                BatchRecord.run_id == self.run.id, BatchRecord.seq > seq,
                BatchRecord.status.in_(ACTIVE_BATCH_STATUSES))).all()
            if later:
                session.execute(update(EvaluationRecord)
                                .where(EvaluationRecord.batch_id.in_(later),
                                       EvaluationRecord.status == EvaluationStatus.ACTIVE)
                                .values(status=EvaluationStatus.ROLLED_BACK, rollback_id=record.id))
                if not self.private:
                    self._set_fact_status(session, later,
                                          FactStatus.PENDING if restore_facts else FactStatus.ROLLED_BACK,
                                          (FactStatus.APPLIED, FactStatus.CLAIMED))
                session.execute(update(BatchRecord).where(BatchRecord.id.in_(later))
                                .values(status=BatchStatus.ROLLED_BACK, rollback_id=record.id))
        return weights

    # -- helpers ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if not self._open:
            raise LedgerError(f"the writer of run {self.run.id} was released; acquire it again")

    def _check_batch(self, batch: ClaimedBatch) -> None:
        self._check_open()
        if batch.run_id != self.run.id:
            raise ValueError(f"batch {batch.id} belongs to run {batch.run_id}, not run {self.run.id}")

    def _in_progress_row(self, session: Session) -> BatchRecord | None:
        return session.scalar(select(BatchRecord).where(BatchRecord.run_id == self.run.id,
                                                        BatchRecord.status == BatchStatus.IN_PROGRESS))

    def _claimed(self, batch: BatchRecord, rows: list[FactRecord]) -> ClaimedBatch:
        return ClaimedBatch(id=batch.id, run_id=batch.run_id, seq=batch.seq,
                            fact_ids=tuple(row.id for row in rows), facts=tuple(row.to_fact() for row in rows),
                            checkpoint_due=batch.seq % self.run.spec.checkpoint_every == 0)

    @staticmethod
    def _finish(session: Session, batch: ClaimedBatch, status: BatchStatus, **values: object) -> None:
        finished = session.execute(update(BatchRecord)
                                   .where(BatchRecord.id == batch.id, BatchRecord.status == BatchStatus.IN_PROGRESS)
                                   .values(status=status, finished_at=utcnow(), **values)).rowcount
        if finished != 1:
            raise BatchStateError(f"batch {batch.seq} (id {batch.id}) of run {batch.run_id} is no longer in "
                                  f"progress (failed or rolled back meanwhile?)")

    @staticmethod
    def _set_fact_status(session: Session, batch_ids: list[int], status: FactStatus,
                         only_from: tuple[FactStatus, ...]) -> None:
        members = select(BatchFact.fact_id).where(BatchFact.batch_id.in_(batch_ids))
        session.execute(update(FactRecord).where(FactRecord.id.in_(members), FactRecord.status.in_(only_from))
                        .values(status=status).execution_options(synchronize_session=False))

    def _store_checkpoint(self, session: Session, batch: ClaimedBatch, snapshot: dict[int, tuple[bytes, str]]) -> None:
        expected = expected_hashes(session, self.run.id, batch.seq)
        wrong = [layer for layer, (_, sha) in snapshot.items() if sha != expected[layer]]
        if wrong:
            raise LedgerIntegrityError(f"checkpoint after batch {batch.seq} disagrees with the recorded hashes "
                                       f"for layers {wrong}: it is not the weights this history produces")
        session.add_all(Checkpoint(run_id=self.run.id, batch_id=batch.id, layer=layer, weights=blob, sha256=sha)
                        for layer, (blob, sha) in snapshot.items())
