"""Asynchronous evaluation's failure paths, on the test suite's Prefect server, with the real evaluate flow.

The editing loop's side (:class:`flows.async_evaluation.AsyncEvaluations`) submits points to a real
deployment of the ``evaluate`` flow on a process work pool. No worker process runs: the tests play the
worker by calling the same flow in-process with the request (claim, lease, record), or by leaving a point
to a worker that died, or by failing its flow run through the Prefect API — then check what the loop does.
"""

from __future__ import annotations

import time
import uuid

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.states import Failed

from db.engine import make_engine
from db.evaluation_requests import claim_request, open_requests, request_evaluation
from db.history import alarms_frame, batches_frame
from db.ingest import ingest_file
from db.ledger import acquire_writer
from db.migrate import upgrade
from db.replay import weights_at
from flows.async_evaluation import AsyncEvaluations
from flows.commands.deploy_evaluator import deploy_evaluator
from flows.pipeline import _apply_policy, evaluate_run, sequential_edit
from flows.run_state import open_run_context
from fixtures.data import counterfact_file
from fixtures.runs import SOURCE, tiny_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

LATE_ALARM = {"action": "rollback", "after_rollback": "continue", "rules": ["retention.es:below:2"]}
"""Fires at every point that has earlier edits to retain (batch 2 on), never at batch 1: a late alarm at 2."""


@pytest.fixture(scope="module")
def deployment() -> str:
    return deploy_evaluator(pool=f"test-{uuid.uuid4().hex[:8]}", name=f"evaluate-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def run(tmp_path, tiny_model_folder):
    """A tiny run of 3 applied batches, health-checked (so it has a baseline at 0), not yet evaluated."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    ingest_file(engine, counterfact_file(12), source=SOURCE)
    settings = tiny_settings(tiny_model_folder, limit=12, health_checks=True, collapse=LATE_ALARM)
    run_id = sequential_edit(settings=settings.to_dict(), db_url=url)["run_id"]
    return url, engine, run_id


def _evaluations(engine, run_id: int, deployment: str, on_alarm=lambda seq: False, lease_s: float = 60.0,
                 max_attempts: int = 3) -> AsyncEvaluations:
    return AsyncEvaluations(engine, run_id, deployment, lease_s, max_attempts, on_alarm=on_alarm)


def test_a_late_alarm_rolls_the_run_back_to_the_last_healthy_point(run, deployment):
    url, engine, run_id = run
    context = open_run_context(engine, run_id)
    with acquire_writer(engine, run_id) as writer:
        background = _evaluations(engine, run_id, deployment, on_alarm=lambda seq: _apply_policy(
            context, writer, context.settings.collapse, seq))
        for seq in (1, 2):
            background.submit(seq)
        for request in open_requests(engine, run_id):  # a worker evaluates both points, later than batch 3
            evaluate_run(run_id=run_id, db_url=url, request_id=request.id)
        assert list(alarms_frame(engine, run_id)["seq"]) == [2]
        assert background.poll() is False  # rolled back, and the policy says: continue
    assert list(batches_frame(engine, run_id)["status"]) == ["applied", "rolled_back", "rolled_back"]
    for layer, weight in weights_at(engine, run_id, 1).items():
        assert torch.equal(context.adapter.weight(layer), weight)  # the model holds batch 1's state again
    assert context.seq == 1


def test_a_failed_flow_run_is_submitted_again(run, deployment):
    url, engine, run_id = run
    background = _evaluations(engine, run_id, deployment)
    background.submit(1)
    [request] = open_requests(engine, run_id)
    with get_client(sync_client=True) as client:  # its flow run fails before any worker claimed the point
        client.set_flow_run_state(request.flow_run_id, Failed(message="worker crashed at start"), force=True)
    assert background.poll() is False
    [again] = open_requests(engine, run_id)
    assert again.id == request.id and again.flow_run_id not in (None, request.flow_run_id)  # a new flow run
    evaluate_run(run_id=run_id, db_url=url, request_id=again.id)
    assert open_requests(engine, run_id) == []  # done once


def test_a_point_whose_workers_keep_dying_stops_the_run_after_max_attempts(run, deployment):
    url, engine, run_id = run
    background = _evaluations(engine, run_id, deployment, lease_s=0.5, max_attempts=2)
    background.submit(1)
    request = open_requests(engine, run_id)[0]
    for attempt in (1, 2):
        assert claim_request(engine, request.id, f"worker-{attempt}", lease_s=0.5).attempts == attempt
        time.sleep(0.6)  # the worker died: its lease runs out
        if attempt == 1:
            assert background.poll() is False  # taken over: submitted again
    with pytest.raises(RuntimeError, match=r"the evaluation of run \d+ at batch 1 failed 2 times"):
        background.poll()


def test_draining_gives_up_after_its_timeout_and_says_how_to_evaluate_by_hand(run, deployment):
    url, engine, run_id = run
    background = _evaluations(engine, run_id, deployment)
    background.submit(3)
    request = request_evaluation(engine, run_id, 3)
    claim_request(engine, request.id, "a-slow-but-live-worker", lease_s=600)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"batches \[3\] were not in after 1 s; `seqedit eval --run \d+ --seq N`"):
        background.drain(timeout_s=1, interval_s=0.2)
    assert time.monotonic() - started < 30
