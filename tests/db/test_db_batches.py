"""The life of a batch: claim, commit, fail, resume after a crash, and sequence numbers after rollback."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import func, select

from db.engine import transaction
from db.errors import BatchStateError, LedgerError, LedgerIntegrityError, RunNotFoundError
from db.history import batches_frame, facts_frame
from db.ledger import acquire_writer
from db.models import BatchFact, RunStatus, WeightDelta
from db.replay import last_applied_seq
from db.runs import get_run, set_run_status
from editing.delta import LowRankDelta, apply_delta, weight_sha256
from fixtures.database import add_facts, apply_and_commit, new_run, random_weights


def _statuses(engine) -> dict[int, str]:
    frame = facts_frame(engine)
    return dict(zip(frame["fact_id"], frame["status"]))


def test_claims_take_pending_facts_in_id_order(database):
    add_facts(database.engine, 10)
    run = new_run(database.engine, random_weights(), batch_size=4)
    generator = torch.Generator().manual_seed(0)
    weights = random_weights()
    with acquire_writer(database.engine, run.id) as writer:
        first = writer.claim_batch()
        assert (first.seq, first.fact_ids) == (1, (1, 2, 3, 4))
        assert [fact.subject for fact in first.facts] == [f"Subject {i}" for i in range(4)]
        assert _statuses(database.engine)[1] == "claimed"
        apply_and_commit(writer, first, weights, generator)
        second = writer.claim_batch(batch_size=5)
        assert (second.seq, second.fact_ids) == (2, (5, 6, 7, 8, 9))
        apply_and_commit(writer, second, weights, generator)
        third = writer.claim_batch()
        assert (third.seq, third.fact_ids) == (3, (10,))
        apply_and_commit(writer, third, weights, generator)
        assert writer.claim_batch() is None
        with pytest.raises(ValueError, match="at least one fact"):
            writer.claim_batch(batch_size=0)
    assert set(_statuses(database.engine).values()) == {"applied"}
    frame = batches_frame(database.engine, run.id)
    assert list(frame["status"]) == ["applied"] * 3 and list(frame["n_facts"]) == [4, 5, 1]


def test_claims_can_be_restricted_to_a_source(database):
    add_facts(database.engine, 3, source="a")
    add_facts(database.engine, 3, source="b", start=3)
    run = new_run(database.engine, random_weights(), batch_size=10, fact_source="b")
    with acquire_writer(database.engine, run.id) as writer:
        batch = writer.claim_batch()
    assert batch.fact_ids == (4, 5, 6)
    assert _statuses(database.engine) == {1: "pending", 2: "pending", 3: "pending",
                                          4: "claimed", 5: "claimed", 6: "claimed"}


def test_private_pools_edit_the_same_facts_without_consuming_them(database):
    add_facts(database.engine, 5, source="study")
    add_facts(database.engine, 2, source="other", start=5)
    weights = random_weights()
    runs = [new_run(database.engine, weights, batch_size=2, fact_pool="private", fact_source="study")
            for _ in range(2)]
    shared = new_run(database.engine, weights, batch_size=10, fact_source="study")
    taken: dict[int, list[tuple[int, ...]]] = {}
    for run in runs:
        generator = torch.Generator().manual_seed(run.id)
        copy = {layer: weight.clone() for layer, weight in weights.items()}
        with acquire_writer(database.engine, run.id) as writer:
            taken[run.id] = []
            while (batch := writer.claim_batch()) is not None:
                taken[run.id].append(batch.fact_ids)
                apply_and_commit(writer, batch, copy, generator)
            # a rollback puts facts back into this run's queue only
            writer.rollback(1)
            assert writer.claim_batch().fact_ids == (3, 4)
    assert taken[runs[0].id] == taken[runs[1].id] == [(1, 2), (3, 4), (5,)]
    assert set(_statuses(database.engine).values()) == {"pending"}
    with acquire_writer(database.engine, shared.id) as writer:  # the shared pool still has all of them
        assert writer.claim_batch().fact_ids == (1, 2, 3, 4, 5)


def test_a_private_pool_needs_a_source(database):
    with pytest.raises(ValueError, match="fact_source"):
        new_run(database.engine, random_weights(), fact_pool="private")
    with pytest.raises(ValueError, match="fact_pool"):
        new_run(database.engine, random_weights(), fact_pool="mine", fact_source="x")


def test_a_crashed_batch_is_resumed_with_the_same_facts(database):
    add_facts(database.engine, 6)
    run = new_run(database.engine, random_weights(), batch_size=3)
    with acquire_writer(database.engine, run.id) as writer:
        claimed = writer.claim_batch()
    # ... the process dies before committing; a new one takes over the run.
    assert last_applied_seq(database.engine, run.id) == 0
    with acquire_writer(database.engine, run.id) as writer:
        resumed = writer.in_progress_batch()
        assert resumed == claimed
        with pytest.raises(BatchStateError, match="in progress"):
            writer.claim_batch()
        apply_and_commit(writer, resumed, random_weights(), torch.Generator().manual_seed(1))
        assert writer.in_progress_batch() is None
        assert last_applied_seq(database.engine, run.id) == 1
        assert writer.claim_batch().seq == 2


def test_a_failed_batch_returns_its_facts_to_the_pool(database):
    add_facts(database.engine, 4)
    run = new_run(database.engine, random_weights(), batch_size=2)
    with acquire_writer(database.engine, run.id) as writer:
        batch = writer.claim_batch()
        writer.fail_batch(batch, "CUDA out of memory")
        assert _statuses(database.engine) == {1: "pending", 2: "pending", 3: "pending", 4: "pending"}
        with pytest.raises(BatchStateError, match="no longer in progress"):
            writer.commit_batch(batch, {}, {})
        retry = writer.claim_batch()
        assert (retry.seq, retry.fact_ids) == (1, (1, 2))
    frame = batches_frame(database.engine, run.id)
    assert list(frame["status"]) == ["failed", "in_progress"]
    assert frame["error"].iloc[0] == "CUDA out of memory"
    with transaction(database.engine) as session:
        assert session.scalar(select(func.count()).select_from(BatchFact)) == 4, "failed batches keep their members"


def test_commit_writes_deltas_statuses_and_timings_together(database):
    add_facts(database.engine, 2)
    weights = random_weights()
    run = new_run(database.engine, weights, batch_size=2)
    with acquire_writer(database.engine, run.id) as writer:
        batch = writer.claim_batch()
        apply_and_commit(writer, batch, weights, torch.Generator().manual_seed(0), rank=3,
                         timings={"values": 1.5, "solve": 0.25})
    with transaction(database.engine) as session:
        deltas = session.execute(select(WeightDelta.layer, WeightDelta.rank, WeightDelta.sha256_after)
                                 .order_by(WeightDelta.layer)).tuples().all()
    assert deltas == [(layer, 3, weight_sha256(weights[layer])) for layer in (1, 3)]
    frame = batches_frame(database.engine, run.id)
    assert (frame["seconds_values"].iloc[0], frame["seconds_solve"].iloc[0]) == (1.5, 0.25)
    assert frame["duration_s"].iloc[0] >= 0
    assert set(_statuses(database.engine).values()) == {"applied"}


def test_commit_rejects_inconsistent_input_and_leaves_the_batch_in_progress(database):
    add_facts(database.engine, 2)
    weights = random_weights()
    run = new_run(database.engine, weights, batch_size=1, checkpoint_every=2)
    delta = LowRankDelta(torch.ones(24, 1), torch.ones(16, 1))
    with acquire_writer(database.engine, run.id) as writer:
        batch = writer.claim_batch()
        with pytest.raises(ValueError, match="hashes for"):
            writer.commit_batch(batch, {1: delta}, {})
        with pytest.raises(ValueError, match="not edited by run"):
            writer.commit_batch(batch, {7: delta}, {7: "0" * 64})
        apply_and_commit(writer, batch, weights, torch.Generator().manual_seed(0))
        due = writer.claim_batch()
        assert due.checkpoint_due
        apply_delta(weights[1], delta)
        hashes = {1: weight_sha256(weights[1])}
        with pytest.raises(ValueError, match="due a checkpoint"):
            writer.commit_batch(due, {1: delta}, hashes)
        with pytest.raises(ValueError, match="every edited layer"):
            writer.commit_batch(due, {1: delta}, hashes, checkpoint={1: weights[1]})
        wrong = {layer: weight + 1 for layer, weight in weights.items()}
        with pytest.raises(LedgerIntegrityError, match="disagrees"):
            writer.commit_batch(due, {1: delta}, hashes, checkpoint=wrong)
        assert writer.in_progress_batch() == due
        writer.commit_batch(due, {1: delta}, hashes, checkpoint=weights)
    assert list(batches_frame(database.engine, run.id)["status"]) == ["applied", "applied"]


def test_rollback_marks_later_batches_and_numbering_resumes(database):
    add_facts(database.engine, 12)
    weights = random_weights()
    run = new_run(database.engine, weights, batch_size=2)
    generator = torch.Generator().manual_seed(0)
    with acquire_writer(database.engine, run.id) as writer:
        for _ in range(5):
            apply_and_commit(writer, writer.claim_batch(), weights, generator)
        writer.claim_batch()  # batch 6, in progress, abandoned by the rollback
        writer.rollback(3, reason="collapse alarm")
        statuses = _statuses(database.engine)
        assert [statuses[i] for i in range(1, 13)] == ["applied"] * 6 + ["pending"] * 6
        again = writer.claim_batch()
        assert (again.seq, again.fact_ids) == (4, (7, 8)), "facts return to the pool in id order"
    frame = batches_frame(database.engine, run.id)
    assert list(frame["seq"]) == [1, 2, 3, 4, 5, 6, 4]
    assert list(frame["status"]) == ["applied"] * 3 + ["rolled_back"] * 3 + ["in_progress"]
    assert list(frame["rolled_back_to"].dropna()) == [3, 3, 3]


def test_rollback_can_keep_facts_out_of_the_pool(database):
    add_facts(database.engine, 4)
    weights = random_weights()
    run = new_run(database.engine, weights, batch_size=2)
    with acquire_writer(database.engine, run.id) as writer:
        for _ in range(2):
            apply_and_commit(writer, writer.claim_batch(), weights, torch.Generator().manual_seed(0))
        writer.rollback(1, restore_facts=False)
        assert writer.claim_batch() is None
    assert _statuses(database.engine) == {1: "applied", 2: "applied", 3: "rolled_back", 4: "rolled_back"}


def test_runs_record_status_and_original_hashes(database):
    weights = random_weights(dtype=torch.bfloat16)
    run = new_run(database.engine, weights, eval_every=5, collapse_policy={"rule": "ppl", "action": "rollback"})
    assert run.original_sha256 == {layer: weight_sha256(weight) for layer, weight in weights.items()}
    assert run.layers == (1, 3) and run.status == RunStatus.CREATED
    set_run_status(database.engine, run.id, "running")
    loaded = get_run(database.engine, run.id)
    assert loaded.status == RunStatus.RUNNING
    assert loaded.spec == run.spec and loaded.spec.collapse_policy["action"] == "rollback"
    with pytest.raises(RunNotFoundError):
        get_run(database.engine, run.id + 1)
    with pytest.raises(ValueError):
        set_run_status(database.engine, run.id, "exploded")


def test_a_released_writer_cannot_write(database):
    run = new_run(database.engine, random_weights())
    with acquire_writer(database.engine, run.id) as writer:
        pass
    with pytest.raises(LedgerError, match="released"):
        writer.claim_batch()
    with pytest.raises(RunNotFoundError):
        with acquire_writer(database.engine, run.id + 1):
            pass

