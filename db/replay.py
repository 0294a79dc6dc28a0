"""Reconstruct a run's edited-layer weights at any applied batch, bit for bit, and prove it.

``weights_at(run, n)`` loads the nearest checkpoint at or before ``n`` (the
origin, checkpoint 0, always exists) and replays the low-rank deltas of the
batches after it with :func:`editing.delta.apply_delta` — the same
deterministic arithmetic the live editor used — so the result is identical to
the weights the model had after batch ``n``. It then checks each layer against
the sha256 the ledger recorded for it: the hash after the last batch ``≤ n``
that changed the layer (or the origin's). Because the expected hashes come
from the delta chain, not from the checkpoint, a checkpoint that disagrees
with the deltas is caught as well as a corrupted delta.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from sqlalchemy import Engine, and_, func, or_, select
from sqlalchemy.orm import Session

from db.engine import transaction
from db.errors import BatchStateError, LedgerIntegrityError
from db.models import BatchRecord, BatchStatus, Checkpoint, WeightDelta
from db.runs import load_run
from db.tensors import delta_from_bytes, keys_from_bytes, weight_from_bytes
from editing.delta import apply_delta, weight_sha256
from editing.lyapunov import LyapunovQueue
from editing.memory import Devices, EditMemory

REPLAY_FETCH_ROWS = 8
"""Delta rows fetched at a time while replaying: bounds memory for large layers."""


def expected_hashes(session: Session, run_id: int, seq: int) -> dict[int, str]:
    """The sha256 each edited layer must have after applied batch ``seq`` of ``run_id``."""
    hashes = dict(session.execute(
        select(Checkpoint.layer, Checkpoint.sha256)
        .where(Checkpoint.run_id == run_id, Checkpoint.batch_id.is_(None))).tuples().all())
    changes = session.execute(
        select(WeightDelta.layer, WeightDelta.sha256_after)
        .join(BatchRecord, WeightDelta.batch_id == BatchRecord.id)
        .where(BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED, BatchRecord.seq <= seq)
        .order_by(BatchRecord.seq)).tuples().all()
    hashes.update(changes)
    return hashes


def last_applied_seq(engine: Engine, run_id: int) -> int:
    """Where the run stands: its last applied batch (0 before the first). Resume restores this point."""
    with transaction(engine) as session:
        load_run(session, run_id)
        return applied_head(session, run_id)


def applied_head(session: Session, run_id: int) -> int:
    """The highest applied sequence number of the run, 0 if none (applied batches are numbered 1..n)."""
    return session.scalar(select(func.max(BatchRecord.seq)).where(
        BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED)) or 0


def weights_at(engine: Engine, run_id: int, seq: int) -> dict[int, torch.Tensor]:
    """The edited layers' weights right after applied batch ``seq`` (0: before any batch), verified.

    Raises :class:`BatchStateError` if batches ``1..seq`` are not all applied
    (e.g. ``seq`` is beyond the run's end or was rolled back), and
    :class:`LedgerIntegrityError` if a stored blob or the replayed result does
    not match its recorded sha256.
    """
    with transaction(engine) as session:
        load_run(session, run_id)
        _require_applied(session, run_id, seq)
        start_seq, weights = _nearest_checkpoint(session, run_id, seq)
        deltas = session.execute(
            select(WeightDelta.layer, WeightDelta.factors)
            .join(BatchRecord, WeightDelta.batch_id == BatchRecord.id)
            .where(BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED,
                   BatchRecord.seq > start_seq, BatchRecord.seq <= seq)
            .order_by(BatchRecord.seq, WeightDelta.layer)
            .execution_options(yield_per=REPLAY_FETCH_ROWS)).tuples()
        for layer, factors in deltas:
            apply_delta(weights[layer], delta_from_bytes(factors))
        expected = expected_hashes(session, run_id, seq)
    for layer, weight in weights.items():
        actual = weight_sha256(weight)
        if actual != expected[layer]:
            raise LedgerIntegrityError(f"run {run_id}: layer {layer} replayed to batch {seq} from checkpoint "
                                       f"{start_seq} has sha256 {actual}, the ledger recorded {expected[layer]}")
    return weights


def _require_applied(session: Session, run_id: int, seq: int) -> None:
    applied = session.scalars(
        select(BatchRecord.seq)
        .where(BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED)
        .order_by(BatchRecord.seq)).all()
    if not 0 <= seq <= len(applied):
        raise BatchStateError(f"run {run_id} has no applied batch {seq}: its applied history is "
                              f"batches 1..{len(applied)} (rolled-back and failed batches cannot be restored)")
    if applied != list(range(1, len(applied) + 1)):
        raise LedgerIntegrityError(f"run {run_id}: applied batches {applied} are not numbered 1..{len(applied)}")


def _nearest_checkpoint(session: Session, run_id: int, seq: int) -> tuple[int, dict[int, torch.Tensor]]:
    """(sequence number, verified weights) of the latest checkpoint at or before ``seq``."""
    point_seq = BatchRecord.seq.label("point_seq")
    batch_id, start_seq = session.execute(
        select(Checkpoint.batch_id, point_seq)
        .outerjoin(BatchRecord, Checkpoint.batch_id == BatchRecord.id)
        .where(Checkpoint.run_id == run_id,
               or_(Checkpoint.batch_id.is_(None),
                   and_(BatchRecord.status == BatchStatus.APPLIED, BatchRecord.seq <= seq)))
        .order_by(point_seq.desc().nulls_last())
        .limit(1)).one()
    start_seq = start_seq or 0
    at_point = Checkpoint.batch_id.is_(None) if batch_id is None else Checkpoint.batch_id == batch_id
    weights = {}
    for layer, blob, sha in session.execute(select(Checkpoint.layer, Checkpoint.weights, Checkpoint.sha256)
                                            .where(Checkpoint.run_id == run_id, at_point)).tuples():
        weight = weight_from_bytes(blob)
        if weight_sha256(weight) != sha:
            raise LedgerIntegrityError(f"run {run_id}: checkpoint of layer {layer} after batch {start_seq} "
                                       f"does not match its recorded sha256 {sha}")
        weights[layer] = weight
    return start_seq, weights


def replay_history(engine: Engine, run_id: int, seq: int) -> Iterator[tuple[int, dict[int, torch.Tensor],
                                                                         dict[int, torch.Tensor]]]:
    """Each applied batch ``1..seq`` in order: its seq, the edited layers' weights right after it (replayed from
    the origin, each changed layer checked against its recorded sha256) and its keys per layer — the history a
    state that depends on every intermediate weight (LyapLock's queue) is rebuilt from."""
    weights = weights_at(engine, run_id, 0)
    with transaction(engine) as session:
        load_run(session, run_id)
        _require_applied(session, run_id, seq)
        rows = session.execute(
            select(BatchRecord.seq, WeightDelta.layer, WeightDelta.factors, WeightDelta.keys, WeightDelta.sha256_after)
            .join(BatchRecord, WeightDelta.batch_id == BatchRecord.id)
            .where(BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED, BatchRecord.seq <= seq)
            .order_by(BatchRecord.seq, WeightDelta.layer)
            .execution_options(yield_per=REPLAY_FETCH_ROWS)).tuples()
        batch_seq, batch_keys = None, {}
        for row_seq, layer, factors, keys, sha in rows:
            if row_seq != batch_seq and batch_keys:
                yield batch_seq, weights, batch_keys
                batch_keys = {}
            batch_seq = row_seq
            apply_delta(weights[layer], delta_from_bytes(factors))
            if weight_sha256(weights[layer]) != sha:
                raise LedgerIntegrityError(f"run {run_id}: layer {layer} replayed through batch {row_seq} does not "
                                           f"match its recorded sha256 {sha}")
            if keys is None:
                raise LedgerIntegrityError(f"run {run_id}: batch {row_seq} has no keys stored for layer {layer}")
            batch_keys[layer] = keys_from_bytes(keys)
        if batch_keys:
            yield batch_seq, weights, batch_keys


def lyapunov_at(engine: Engine, run_id: int, seq: int, queue: LyapunovQueue) -> LyapunovQueue:
    """LyapLock's queue after applied batch ``seq``: ``queue`` (empty, :meth:`LyapunovQueue.empty`) fed every
    applied batch's weights and keys in order, as the live run fed it."""
    for _, weights, keys in replay_history(engine, run_id, seq):
        queue.add(weights, keys)
    return queue


def edit_memory_at(engine: Engine, run_id: int, seq: int, devices: Devices = "cpu",
                   memory: EditMemory | None = None) -> EditMemory:
    """The run's edit memory after applied batch ``seq``: ``S = Σ K_p K_pᵀ`` per layer over batches
    ``1..seq``, in batch order, from the stored keys (each checked against its sha256) — the sum the live
    run computed, bit for bit. Batches rolled back are not in it. ``memory`` is the empty memory to fill
    (:meth:`EditMemory.empty`: one that also keeps RLSEdit's running inverses); a plain one by default."""
    with transaction(engine) as session:
        load_run(session, run_id)
        _require_applied(session, run_id, seq)
        rows = session.execute(
            select(BatchRecord.seq, WeightDelta.layer, WeightDelta.keys, WeightDelta.keys_sha256)
            .join(BatchRecord, WeightDelta.batch_id == BatchRecord.id)
            .where(BatchRecord.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED, BatchRecord.seq <= seq)
            .order_by(BatchRecord.seq, WeightDelta.layer)
            .execution_options(yield_per=REPLAY_FETCH_ROWS)).tuples()
        memory = EditMemory() if memory is None else memory
        batch_seq, batch_keys = None, {}
        for row_seq, layer, blob, sha in rows:
            if row_seq != batch_seq and batch_keys:
                memory.add(batch_keys, devices)
                batch_keys = {}
            batch_seq = row_seq
            if blob is None:
                raise LedgerIntegrityError(f"run {run_id}: batch {row_seq} has no keys stored for layer {layer}; "
                                           "its edit memory cannot be rebuilt (recorded before ledgers kept keys?)")
            if hashlib.sha256(bytes(blob)).hexdigest() != sha:
                raise LedgerIntegrityError(f"run {run_id}: the keys of batch {row_seq} at layer {layer} do not match "
                                           f"their recorded sha256 {sha}")
            batch_keys[layer] = keys_from_bytes(blob)
        if batch_keys:
            memory.add(batch_keys, devices)
    return memory
