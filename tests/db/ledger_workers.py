"""Entry points of the processes the concurrency tests start (``multiprocessing`` with spawn).

They live in a module of their own because a spawned process imports its
target by module name, and must not depend on pytest's fixtures.
"""

from __future__ import annotations

import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event

from db.engine import make_engine
from db.ledger import acquire_writer


EDIT_SECONDS = 0.01
"""Stand-in for computing an edit between claim and commit; it also lets the other workers run."""


def claim_until_empty(url: str, run_id: int, barrier: Barrier, results: Queue) -> None:
    """Claim and commit batches for ``run_id`` until the pool is empty; report the fact ids claimed."""
    engine = make_engine(url)
    claimed: list[int] = []
    with acquire_writer(engine, run_id) as writer:
        barrier.wait()
        while (batch := writer.claim_batch()) is not None:
            claimed.extend(batch.fact_ids)
            time.sleep(EDIT_SECONDS)
            writer.commit_batch(batch, {}, {})
    engine.dispose()
    results.put((run_id, claimed))


def hold_writer(url: str, run_id: int, acquired: Event) -> None:
    """Take the run's writer lock, say so, and keep it until killed."""
    with acquire_writer(make_engine(url), run_id):
        acquired.set()
        time.sleep(600)
