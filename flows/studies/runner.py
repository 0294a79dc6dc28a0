"""Running a study: its facts ingested, its arms as ledger rows, each arm a Prefect flow run.

``run_study`` opens the study (arms already in the ledger keep their rows and
results), then runs every arm that is not done — in this process, one after
another, or, when the spec names a ``deployment`` of the ``study-arm`` flow, as
flow runs submitted to that deployment's work pool (the pattern of the
asynchronous evaluation: Prefect hands each to a worker on any machine that has
seqedit, the model and the data, and reaches the ledger) and waited for. Running
the command again continues an interrupted study: a done arm is never redone; an
independent arm resumes at its first missing batch, a sequential arm resumes its
run (``sequential_edit(run_id=…)``).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from typing import Any

from prefect import flow
from sqlalchemy import Engine, select

from db.engine import absolute_url, make_engine
from db.ingest import ingest_records
from db.locks import writer_lock
from db.migrate import require_current
from db.models import RunRecord, RunStatus, StudyRecord, StudyStatus
from db.readers import read_records
from db.studies import (ArmInfo, add_arm_seconds, get_arm, open_study, source_facts, study_arms, update_arm,
                        v_star_counts)
from flows.studies.spec import FactsSpec, StudySpec

log = logging.getLogger(__name__)

ARM_FLOW = "study-arm"
FINISHED_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def ingest_study_facts(engine: Engine, facts: FactsSpec) -> str:
    """Records ``[start, stop)`` of the spec's file under the source :meth:`FactsSpec.source_name` (idempotent)."""
    from flows.commands.ingest import fact_source_path  # PATH|DATASET, as `seqedit ingest` reads it

    records = itertools.islice(read_records(fact_source_path(facts.file)[0]), facts.start, facts.stop)
    summary = ingest_records(engine, records, facts.source_name())
    if summary.records and summary.accepted + summary.unchanged == 0:
        raise ValueError(f"facts: no valid record in {facts.file} [{facts.start}:{facts.stop}] "
                         f"(`seqedit ingest` says why each was rejected)")
    return facts.source_name()


def arm_facts(engine: Engine, arm: ArmInfo, source: str):
    """The arm's facts: the first ``n_facts`` valid facts of the study's source, in record order."""
    facts = source_facts(engine, source)
    n_facts = int(arm.settings["n_facts"])
    if len(facts) < n_facts:
        raise ValueError(f"arm {arm.name}: n_facts {n_facts}, but the study's facts ({source}) hold {len(facts)}")
    return facts[:n_facts]


def prepare_study(engine: Engine, spec: StudySpec) -> tuple[int, list[ArmInfo]]:
    """Ingest the facts and record the study and its arms (nothing is edited)."""
    source = ingest_study_facts(engine, spec.facts)
    return open_study(engine, spec.name, spec.raw, source,
                      [(arm.name, arm.mode, arm.to_row()) for arm in spec.arms])


@flow(name=ARM_FLOW, flow_run_name="study arm {arm_id}")
def study_arm(arm_id: int, db_url: str | None = None) -> dict[str, Any]:
    """Run (or continue) one arm of a study; its status, run and time are kept with it in the ledger."""
    engine = make_engine(db_url)
    require_current(engine)
    arm = get_arm(engine, arm_id)
    if arm.status == StudyStatus.DONE:
        return {"arm": arm.name, "status": "done", "skipped": True}
    source = _study_source(engine, arm.study_id)
    lock = writer_lock(engine, arm.id, subject="arm")
    lock.acquire()  # a second process on the same arm is refused at once (RunLockedError)
    try:
        update_arm(engine, arm.id, status=StudyStatus.RUNNING, error=None,
                   worker=f"{socket.gethostname()}:{os.getpid()}:{os.getppid()}")
        started = time.perf_counter()
        try:
            if arm.mode == "independent":
                from flows.studies.independent import run_independent_arm

                facts = arm_facts(engine, arm, source)
                outcome: dict[str, Any] = {"v_star": run_independent_arm(engine, arm, facts)}
            else:
                outcome = _run_sequential_arm(engine, arm, db_url)
        except BaseException as error:
            update_arm(engine, arm.id, status=StudyStatus.FAILED, error=f"{type(error).__name__}: {error}"[:2000])
            raise
        finally:
            add_arm_seconds(engine, arm.id, time.perf_counter() - started)
        update_arm(engine, arm.id, status=StudyStatus.DONE)
    finally:
        lock.release()
    return {"arm": arm.name, "status": "done", **outcome}


def _study_source(engine: Engine, study_id: int) -> str:
    with engine.connect() as connection:
        return connection.execute(select(StudyRecord.fact_source).where(StudyRecord.id == study_id)).scalar_one()


def _run_sequential_arm(engine: Engine, arm: ArmInfo, db_url: str | None) -> dict[str, Any]:
    """The arm's run, created or resumed (found by its id, or by its name if the process died before the
    id was kept)."""
    from flows.pipeline import sequential_edit

    settings = {k: v for k, v in arm.settings.items() if k not in ("n_facts", "seed")}
    run_id = arm.run_id or _run_named(engine, settings["name"])
    if run_id is None:
        outcome = sequential_edit(settings=settings, db_url=db_url)
    else:
        update_arm(engine, arm.id, run_id=run_id)
        outcome = sequential_edit(run_id=run_id, db_url=db_url) if _unfinished(engine, run_id) else \
            {"run_id": run_id, "status": "completed"}
    update_arm(engine, arm.id, run_id=outcome["run_id"])
    return {"run_id": outcome["run_id"], "run_status": outcome["status"]}


def _run_named(engine: Engine, name: str) -> int | None:
    with engine.connect() as connection:
        return connection.execute(select(RunRecord.id).where(RunRecord.name == name)
                                  .order_by(RunRecord.id.desc()).limit(1)).scalar_one_or_none()


def _unfinished(engine: Engine, run_id: int) -> bool:
    with engine.connect() as connection:
        status = connection.execute(select(RunRecord.status).where(RunRecord.id == run_id)).scalar_one()
    return status not in (RunStatus.COMPLETED, RunStatus.STOPPED)


@flow(name="study")
def run_study(study_id: int, db_url: str | None = None, deployment: str | None = None,
              poll_s: float = 2.0) -> dict[str, Any]:
    """Every arm of study ``study_id`` that is not done: here (each a subflow run), or on ``deployment``'s
    work pool. Returns each arm's status and the study's v* counts."""
    engine = make_engine(db_url)
    require_current(engine)
    todo = [arm for arm in study_arms(engine, study_id) if arm.status != StudyStatus.DONE]
    if deployment is None:
        for arm in todo:
            print(f"arm {arm.name} ({arm.mode}) …", flush=True)
            study_arm(arm.id, db_url)
    else:
        _run_on_pool(engine, todo, deployment, db_url, poll_s)
    arms = study_arms(engine, study_id)
    return {"arms": {arm.name: str(arm.status) for arm in arms},
            "v_star": v_star_counts(engine, [arm.id for arm in arms])}


def _run_on_pool(engine: Engine, arms: list[ArmInfo], deployment: str, db_url: str | None, poll_s: float) -> None:
    """Submit each arm as a flow run of ``deployment`` and wait until every one has finished; an arm whose
    flow run ended without the arm being done is reported (re-running the study continues it)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    url = absolute_url(db_url if db_url is not None else engine.url)
    flow_runs = {}
    for arm in arms:
        flow_run = run_deployment(deployment, parameters={"arm_id": arm.id, "db_url": url}, timeout=0,
                                  as_subflow=False, tags=["seqedit", "study"])
        update_arm(engine, arm.id, flow_run_id=str(flow_run.id))
        flow_runs[arm.id] = flow_run.id
        print(f"arm {arm.name}: submitted to {deployment} (flow run {flow_run.id})", flush=True)
    with get_client(sync_client=True) as client:
        while flow_runs:
            time.sleep(poll_s)
            for arm_id, flow_run_id in list(flow_runs.items()):
                state = client.read_flow_run(flow_run_id).state
                if state is not None and state.type.value in FINISHED_STATES:
                    del flow_runs[arm_id]
                    arm = get_arm(engine, arm_id)
                    print(f"arm {arm.name}: flow run {state.type.value.lower()}, arm {arm.status}", flush=True)
    failed = [arm.name for arm in (get_arm(engine, a.id) for a in arms) if arm.status != StudyStatus.DONE]
    if failed:
        raise RuntimeError(f"arms not done: {', '.join(failed)} (run the study again to continue them)")
