"""Evaluation requests: claimed with leases, completed with their metrics, never recorded twice."""

from __future__ import annotations

import time

import pytest
import torch

from db.errors import BatchStateError, RequestLostError
from db.evaluation_requests import (claim_request, fail_request, open_requests, renew_lease, request_evaluation,
                                    set_flow_run)
from db.evaluations import AlarmRow, record_evaluation
from db.history import alarms_frame, evaluations_frame
from db.ledger import acquire_writer
from db.models import RequestStatus
from fixtures.database import add_facts, apply_and_commit, new_run, random_weights


@pytest.fixture
def three_batches(database):
    add_facts(database.engine, 6)
    weights = random_weights()
    run = new_run(database.engine, weights, batch_size=2)
    generator = torch.Generator().manual_seed(0)
    with acquire_writer(database.engine, run.id) as writer:
        for _ in range(3):
            apply_and_commit(writer, writer.claim_batch(), weights, generator)
    return database.engine, run


def test_a_request_is_claimed_once_and_done_with_its_metrics(three_batches):
    engine, run = three_batches
    request = request_evaluation(engine, run.id, 2)
    assert request_evaluation(engine, run.id, 2).id == request.id  # one open request per batch
    set_flow_run(engine, request.id, "flow-run-1")
    first = claim_request(engine, request.id, "worker-a", lease_s=60)
    assert first is not None and (first.status, first.attempts, first.seq) == (RequestStatus.RUNNING, 1, 2)
    assert claim_request(engine, request.id, "worker-b", lease_s=60) is None  # a live lease is respected
    assert renew_lease(engine, request.id, "worker-a", 60) and not renew_lease(engine, request.id, "worker-b", 60)
    alarm = AlarmRow("ppl.*:ratio:2", "ppl.x", 30.0, 10.0, 2.0, "warn", "ppl.x = 30")
    evaluation = record_evaluation(engine, run.id, 2, [("ppl.x", 30.0)], alarms=[alarm],
                                   request=(request.id, "worker-a"))
    done = request_evaluation(engine, run.id, 2)
    assert (done.status, done.evaluation_id) == (RequestStatus.DONE, evaluation)
    assert list(alarms_frame(engine, run.id)["evaluation_id"]) == [evaluation]
    assert claim_request(engine, request.id, "worker-b", lease_s=60) is None
    assert open_requests(engine, run.id) == []


def test_an_expired_lease_is_taken_over_and_the_late_worker_records_nothing(three_batches):
    engine, run = three_batches
    request = request_evaluation(engine, run.id, 1)
    assert claim_request(engine, request.id, "dead-worker", lease_s=0.2) is not None
    time.sleep(0.3)
    (stale,) = open_requests(engine, run.id)
    assert stale.lease_expired()
    taken = claim_request(engine, request.id, "live-worker", lease_s=60)
    assert taken is not None and taken.attempts == 2
    with pytest.raises(RequestLostError, match="no longer held by dead-worker"):
        record_evaluation(engine, run.id, 1, [("es", 1.0)], request=(request.id, "dead-worker"))
    assert evaluations_frame(engine, run.id).empty  # the late result left nothing behind
    record_evaluation(engine, run.id, 1, [("es", 1.0)], request=(request.id, "live-worker"))
    assert list(evaluations_frame(engine, run.id)["seq"]) == [1]


def test_failed_requests_are_requested_again_and_rolled_back_batches_need_none(three_batches):
    engine, run = three_batches
    request = request_evaluation(engine, run.id, 3)
    claim_request(engine, request.id, "worker", lease_s=60)
    fail_request(engine, request.id, "worker", "RuntimeError: out of memory")
    (failed,) = open_requests(engine, run.id)
    assert (failed.status, failed.error) == (RequestStatus.FAILED, "RuntimeError: out of memory")
    again = request_evaluation(engine, run.id, 3)
    assert again.id != request.id and again.status == RequestStatus.PENDING
    assert [r.id for r in open_requests(engine, run.id)] == [again.id]
    with acquire_writer(engine, run.id) as writer:
        writer.rollback(2)
    assert open_requests(engine, run.id) == []  # batch 3 is no longer in the history
    assert claim_request(engine, again.id, "worker", lease_s=60) is None
    with pytest.raises(BatchStateError, match="no applied batch 3"):
        request_evaluation(engine, run.id, 3)
