"""Scale-out on Prefect's own machinery: a server on PostgreSQL, a process work pool, two workers.

The deployment the README describes, started for real as child processes:
``prefect server start`` backed by a PostgreSQL database of its own,
``seqedit deploy-evaluator`` (process work pool ``seqedit``), two
``prefect worker start --pool seqedit``, and ``seqedit run --eval-mode async``
on a PostgreSQL ledger: 3 batches, each an evaluation point submitted to the
pool while editing goes on. One worker is SIGKILLed (with the flow run it is
executing) in the middle of an evaluation; the run must still end with every
point evaluated exactly once — the lost one claimed again by the other worker
once its lease ran out — and nothing recorded twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select, text

from db.engine import make_engine
from db.evaluation_requests import open_requests
from db.history import evaluations_frame, runs_frame
from db.migrate import upgrade
from db.models import EvaluationRequest, RequestStatus
from fixtures.database import POSTGRES_URL, postgres_schema
from fixtures.processes import parent
from fixtures.runs import SMALL_EVALUATION, fast_settings, ingest_counterfact
from flows.local_prefect import prefect_server, start_worker, stop_process_group

pytestmark = [pytest.mark.postgres, pytest.mark.scaleout]

LEASE_S = 12


@pytest.fixture
def prefect_on_postgres(postgres_admin, tmp_path: Path):
    """A Prefect server whose own database is a fresh PostgreSQL database; yields (API URL, environment)."""
    name = f"prefect_scaleout_{uuid.uuid4().hex[:10]}"
    with postgres_admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    server_db = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql+asyncpg://").rsplit("/", 1)[0] + f"/{name}"
    try:
        with prefect_server(tmp_path / "prefect-server", tmp_path / "server.log", database_url=server_db) as api:
            env = dict(os.environ, PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect-client"),
                       PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2",
                       OMP_NUM_THREADS="1")
            yield api, env
    finally:
        with postgres_admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _seqedit(*args: str, env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_async_evaluation_on_two_workers_survives_a_killed_worker(prefect_on_postgres, postgres_admin, tmp_path):
    api, env = prefect_on_postgres
    with postgres_schema(postgres_admin) as ledger_url:
        upgrade(ledger_url)
        engine = make_engine(ledger_url)
        ingest_counterfact(engine)
        deploy = _seqedit("deploy-evaluator", "--pool", "seqedit", env=env)
        output, _ = deploy.communicate(timeout=300)
        assert deploy.returncode == 0, output
        workers = [start_worker("seqedit", env, tmp_path / f"worker-{index}.log") for index in range(2)]
        try:
            settings = fast_settings(limit=24, eval_every=1, eval_mode="async", eval_lease_s=LEASE_S,
                                     evaluation_overrides=SMALL_EVALUATION, fact_pool="private")
            config = tmp_path / "run.yaml"
            config.write_text(yaml.safe_dump(settings.to_dict()))
            run = _seqedit("run", "--db", ledger_url, "--config", str(config), "--json", env=env)
            victim = _kill_a_worker_mid_evaluation(engine, workers, run)
            output, _ = run.communicate(timeout=1200)
            assert run.returncode == 0, output
            assert '"status": "completed"' in output
        finally:
            for worker in workers:
                stop_process_group(worker)
        run_id = int(runs_frame(engine)["run_id"].max())
        evaluations = evaluations_frame(engine, run_id)
        full = evaluations[evaluations["kind"] == "full"]
        assert sorted(full["seq"]) == [0, 1, 2, 3]  # every point once: none lost, none twice
        with engine.connect() as connection:
            requests = connection.execute(select(EvaluationRequest.status, EvaluationRequest.attempts,
                                                 EvaluationRequest.worker)
                                          .where(EvaluationRequest.run_id == run_id)).all()
        assert len(requests) == 3 and {status for status, _, _ in requests} == {RequestStatus.DONE}
        assert max(attempts for _, attempts, _ in requests) >= 2  # the killed worker's point was claimed again
        assert any(str(victim) not in (worker or "") for _, attempts, worker in requests if attempts >= 2)
        assert open_requests(engine, run_id) == []
        engine.dispose()


def _kill_a_worker_mid_evaluation(engine, workers: list[subprocess.Popen], run: subprocess.Popen) -> int:
    """Wait for a request to be claimed by a flow run of one of our workers, then SIGKILL that worker's
    process group (the worker and the flow run it is executing). Returns the killed flow run's pid."""
    deadline = time.monotonic() + 900
    worker_pids = {worker.pid for worker in workers}
    while time.monotonic() < deadline:
        if run.poll() is not None:
            pytest.fail(f"the run ended before any evaluation was claimed:\n{run.stdout.read()}")
        with engine.connect() as connection:
            held = connection.execute(select(EvaluationRequest.worker).where(
                EvaluationRequest.status == RequestStatus.RUNNING)).scalars().first()
        if held:
            flow_pid = int(held.split(":")[1])
            worker = parent(flow_pid)
            assert worker in worker_pids, f"flow run {flow_pid} is not a child of our workers {worker_pids}"
            # the claim is the evaluation's first step (the ledger says a worker holds it): kill now
            for group in {os.getpgid(flow_pid), worker}:  # the worker, and the flow run (in case it has its own)
                os.killpg(group, signal.SIGKILL)
            return flow_pid
        time.sleep(0.5)
    pytest.fail("no evaluation request was claimed within 15 minutes")
