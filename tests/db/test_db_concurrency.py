"""Concurrency with real processes: claims never overlap, and a run has one writer at a time."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter

import pytest

from db.errors import RunLockedError
from db.history import facts_frame
from db.ledger import acquire_writer
from fixtures.database import add_facts, new_run, random_weights
from ledger_workers import claim_until_empty, hold_writer

PROCESSES = 3
POOL = 600
BATCH_SIZE = 5
SPAWN = multiprocessing.get_context("spawn")


def test_processes_claiming_from_one_pool_never_share_a_fact(database):
    add_facts(database.engine, POOL)
    runs = [new_run(database.engine, random_weights(), batch_size=BATCH_SIZE, checkpoint_every=10**6).id
            for _ in range(PROCESSES)]
    barrier, results = SPAWN.Barrier(PROCESSES), SPAWN.Queue()
    workers = [SPAWN.Process(target=claim_until_empty, args=(database.url, run_id, barrier, results))
               for run_id in runs]
    for worker in workers:
        worker.start()
    claimed = dict(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    counts = Counter(fact_id for ids in claimed.values() for fact_id in ids)
    assert set(counts) == set(range(1, POOL + 1)), "the union of the claims is the pool"
    assert max(counts.values()) == 1, "no fact was claimed twice"
    sizes = {run_id: len(ids) for run_id, ids in claimed.items()}
    assert sum(1 for size in sizes.values() if size) >= 2, f"the processes did not compete: {sizes}"
    assert set(facts_frame(database.engine)["status"]) == {"applied"}


def test_a_second_writer_is_refused_until_the_first_is_gone(database):
    run = new_run(database.engine, random_weights())
    other = new_run(database.engine, random_weights())
    with acquire_writer(database.engine, run.id):
        with pytest.raises(RunLockedError, match=f"run {run.id} already has a writer"):
            with acquire_writer(database.engine, run.id):
                pass
        with acquire_writer(database.engine, other.id):
            pass  # other runs are not affected
    acquired = SPAWN.Event()
    holder = SPAWN.Process(target=hold_writer, args=(database.url, run.id, acquired))
    holder.start()
    try:
        assert acquired.wait(timeout=60), "the holder process did not get the lock"
        with pytest.raises(RunLockedError, match="already has a writer"):
            with acquire_writer(database.engine, run.id):
                pass
    finally:
        holder.kill()  # a crash: no chance to release anything
        holder.join(timeout=30)
    deadline = time.monotonic() + 20
    while True:  # PostgreSQL ends the dead client's session (and its locks) within moments
        try:
            with acquire_writer(database.engine, run.id):
                break
        except RunLockedError:
            assert time.monotonic() < deadline, "the lock of a killed writer was never released"
            time.sleep(0.1)
