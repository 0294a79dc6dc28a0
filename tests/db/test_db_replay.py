"""Exact rollback: the weights after any applied batch are reproduced bit for bit and verified."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import update

from db.engine import transaction
from db.errors import BatchStateError, LedgerIntegrityError
from db.history import batches_frame
from db.ledger import acquire_writer
from db.models import Checkpoint, WeightDelta
from db.replay import weights_at
from db.tensors import delta_from_bytes, delta_to_bytes, weight_to_bytes
from editing.delta import LowRankDelta, weight_sha256
from fixtures.database import add_facts, apply_and_commit, new_run, random_weights

N_BATCHES = 50


def _snapshot(weights: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    return {layer: weight.clone() for layer, weight in weights.items()}


def _assert_same(actual: dict[int, torch.Tensor], expected: dict[int, torch.Tensor], label: str) -> None:
    assert actual.keys() == expected.keys(), label
    for layer in expected:
        assert actual[layer].dtype == expected[layer].dtype, f"{label}, layer {layer}"
        assert torch.equal(actual[layer], expected[layer]), f"{label}, layer {layer}"
        assert weight_sha256(actual[layer]) == weight_sha256(expected[layer]), f"{label}, layer {layer}"


@pytest.fixture
def edited_run(database):
    """A run of 50 random low-rank batches on float32 and bfloat16 layers, checkpoints every 10.

    Returns (database, run, weights after each batch 0..50).
    """
    add_facts(database.engine, N_BATCHES)
    weights = random_weights({0: (48, 32)}) | random_weights({5: (40, 24)}, dtype=torch.bfloat16, seed=1)
    run = new_run(database.engine, weights, batch_size=1, checkpoint_every=10)
    history = [_snapshot(weights)]
    generator = torch.Generator().manual_seed(42)
    with acquire_writer(database.engine, run.id) as writer:
        for seq in range(1, N_BATCHES + 1):
            batch = writer.claim_batch()
            assert batch.seq == seq and batch.checkpoint_due == (seq % 10 == 0)
            apply_and_commit(writer, batch, weights, generator, rank=1 + seq % 4)
            history.append(_snapshot(weights))
    return database, run, history


def test_every_point_is_reproduced_bit_for_bit(edited_run):
    database, run, history = edited_run
    for seq in range(N_BATCHES + 1):
        _assert_same(weights_at(database.engine, run.id, seq), history[seq], f"batch {seq}")


def test_rollback_restores_then_history_continues(edited_run):
    database, run, history = edited_run
    generator = torch.Generator().manual_seed(7)
    with acquire_writer(database.engine, run.id) as writer:
        restored = writer.rollback(23)
        _assert_same(restored, history[23], "rollback to 23")
        with pytest.raises(BatchStateError, match="no applied batch 30"):
            weights_at(database.engine, run.id, 30)
        for seq in range(24, 32):  # 27 facts went back to the pool; take 8 of them
            apply_and_commit(writer, writer.claim_batch(), restored, generator)
        new_history = _snapshot(restored)
        _assert_same(writer.rollback(0), history[0], "rollback to the origin")
    _assert_same(weights_at(database.engine, run.id, 0), history[0], "origin after everything")
    frame = batches_frame(database.engine, run.id)
    assert len(frame) == N_BATCHES + 8, "rolled-back batches are kept"
    assert (frame["status"] == "rolled_back").sum() == N_BATCHES + 8
    assert not torch.equal(new_history[0], history[31][0])


def test_replay_after_a_new_checkpoint_past_a_rollback(edited_run):
    database, run, history = edited_run
    generator = torch.Generator().manual_seed(3)
    with acquire_writer(database.engine, run.id) as writer:
        weights = writer.rollback(15)
        after = {}
        for seq in range(16, 22):
            batch = writer.claim_batch()
            apply_and_commit(writer, batch, weights, generator)
            after[seq] = _snapshot(weights)
    for seq in range(16, 22):  # batch 20's new checkpoint is used, the rolled-back one is not
        _assert_same(weights_at(database.engine, run.id, seq), after[seq], f"new batch {seq}")
    _assert_same(weights_at(database.engine, run.id, 12), history[12], "batch 12")


def test_a_corrupted_delta_is_detected(edited_run):
    database, run, _ = edited_run
    tampered = delta_to_bytes(LowRankDelta(torch.zeros(48, 1), torch.zeros(32, 1)))
    batch_id = int(batches_frame(database.engine, run.id).set_index("seq").loc[33, "batch_id"])
    with transaction(database.engine, write=True) as session:
        session.execute(update(WeightDelta).where(WeightDelta.batch_id == batch_id, WeightDelta.layer == 0)
                        .values(factors=tampered))
    weights_at(database.engine, run.id, 32)
    with pytest.raises(LedgerIntegrityError, match="layer 0 replayed to batch 3[3-9]"):
        weights_at(database.engine, run.id, 33)
    with pytest.raises(LedgerIntegrityError):
        weights_at(database.engine, run.id, 39)
    weights_at(database.engine, run.id, 40)  # the checkpoint after batch 40 does not depend on it


def test_a_corrupted_checkpoint_is_detected(edited_run):
    database, run, _ = edited_run
    with transaction(database.engine, write=True) as session:
        session.execute(update(Checkpoint).where(Checkpoint.run_id == run.id, Checkpoint.batch_id.is_(None),
                                                 Checkpoint.layer == 5)
                        .values(weights=weight_to_bytes(torch.zeros(40, 24, dtype=torch.bfloat16))))
    with pytest.raises(LedgerIntegrityError, match="checkpoint of layer 5 after batch 0"):
        weights_at(database.engine, run.id, 4)
    weights_at(database.engine, run.id, 14)


def test_points_outside_the_history_are_refused(edited_run):
    database, run, _ = edited_run
    for seq in (-1, N_BATCHES + 1):
        with pytest.raises(BatchStateError, match="applied history is batches 1..50"):
            weights_at(database.engine, run.id, seq)


def test_deltas_round_trip_through_safetensors_bytes():
    delta = LowRankDelta(torch.randn(5, 2, dtype=torch.float64), torch.randn(3, 2).to(torch.bfloat16))
    back = delta_from_bytes(delta_to_bytes(delta))
    assert torch.equal(back.u, delta.u) and torch.equal(back.v, delta.v) and back.v.dtype == torch.bfloat16


def test_the_edit_memory_is_rebuilt_exactly_after_rollback_and_new_batches(database):
    """S = Σ K_p K_pᵀ over the batches still applied, summed here from the keys the test generated."""
    from db.replay import edit_memory_at

    engine = database.engine
    add_facts(engine, 40)
    weights = random_weights()
    run = new_run(engine, weights, batch_size=2, checkpoint_every=3)
    generator = torch.Generator().manual_seed(5)
    applied: list[dict[int, torch.Tensor]] = []

    def commit_one(writer) -> None:
        keys = {layer: torch.randn(weight.shape[1], 2, generator=generator) for layer, weight in weights.items()}
        apply_and_commit(writer, writer.claim_batch(), weights, generator, keys=keys)
        applied.append(keys)

    def from_scratch(history: list[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        memory = {layer: torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64) for layer, w in weights.items()}
        for keys in history:
            for layer, k in keys.items():
                memory[layer] = memory[layer] + k.double() @ k.double().T
        return memory

    with acquire_writer(engine, run.id) as writer:
        for _ in range(8):
            commit_one(writer)
        for seq in (8, 5):
            rebuilt = edit_memory_at(engine, run.id, seq)
            expected = from_scratch(applied[:seq])
            assert rebuilt.batches == seq
            assert all(torch.equal(rebuilt.at(layer), expected[layer]) for layer in weights)
        writer.rollback(3)
        del applied[3:]
        weights.update(weights_at(engine, run.id, 3))
        for _ in range(2):  # batches 4 and 5 again, with other keys
            commit_one(writer)
    rebuilt = edit_memory_at(engine, run.id, 5)
    expected = from_scratch(applied)
    assert all(torch.equal(rebuilt.at(layer), expected[layer]) for layer in weights)
    assert edit_memory_at(engine, run.id, 0).layers() == []
    with transaction(engine, write=True) as session:  # a corrupted key blob is caught
        session.execute(update(WeightDelta).values(keys_sha256="0" * 64))
    with pytest.raises(LedgerIntegrityError, match="keys of batch 1"):
        edit_memory_at(engine, run.id, 2)
