"""No claimed fact is lost: a run that stops gives its batch back, and a dead run's claims are taken back."""

from __future__ import annotations

from pathlib import Path

from db.history import batches_frame, facts_frame
from db.ledger import acquire_writer, release_abandoned_claims
from fixtures.database import add_facts, apply_and_commit, new_run, random_weights

import torch


def test_a_dead_runs_claimed_batch_is_taken_back_and_a_live_ones_is_not(database):
    engine = database.engine
    add_facts(engine, 6)
    dead = new_run(engine, random_weights(), batch_size=2)
    live = new_run(engine, random_weights(), batch_size=2)
    with acquire_writer(engine, dead.id) as writer:  # the process dies here: the lock goes with it
        apply_and_commit(writer, writer.claim_batch(), random_weights(), torch.Generator().manual_seed(0))
        stranded = writer.claim_batch()
    with acquire_writer(engine, live.id) as writer:
        held = writer.claim_batch()
        assert release_abandoned_claims(engine) == [(dead.id, 2)]  # the live writer's batch stays its own
        statuses = facts_frame(engine).set_index("fact_id")["status"]
        assert [statuses[i] for i in stranded.fact_ids] == ["pending", "pending"]
        assert [statuses[i] for i in held.fact_ids] == ["claimed", "claimed"]
    assert list(batches_frame(engine, dead.id)["status"]) == ["applied", "failed"]
    assert release_abandoned_claims(engine, except_run=live.id) == []
    assert release_abandoned_claims(engine) == [(live.id, 1)]  # now nobody writes it either
    with acquire_writer(engine, dead.id) as writer:  # resuming the dead run: it claims again, nothing lost
        assert writer.claim_batch().fact_ids == stranded.fact_ids


def test_the_lock_file_of_a_sqlite_run_is_removed_when_released(tmp_path):
    from db.engine import make_engine
    from db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    run = new_run(engine, random_weights())
    lock = Path(f"{tmp_path / 'ledger.db'}.run-{run.id}.lock")
    with acquire_writer(engine, run.id):
        assert lock.exists() and "pid" in lock.read_text()
    assert not lock.exists()
    with acquire_writer(engine, run.id):  # and taken again as before
        assert lock.exists()
