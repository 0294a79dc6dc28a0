"""Scheduled bulk updates executed by the serving process itself, so the model stays loaded between them.

``prefect.serve`` starts every flow run of a deployment in a new process, which loads the model (and reads
C0) again each time: seconds for SmolLM2, minutes for an 8B model, for a run that may edit a handful of facts.
Here the deployment is registered with its schedule as before — the Prefect server creates the scheduled
flow runs, the UI shows them — but no Prefect runner picks them up: :func:`serve_resident` polls for the
deployment's flow runs that are due and runs each *in this process* (``prefect.flow_engine.run_flow`` on the
scheduled flow run, so its state, logs and artifacts are the flow run's). The process's
:class:`flows.model_session.ModelSession` keeps the model; each run restores the run's state from the ledger
into it and verifies every layer's hash before editing (:func:`flows.run_state.open_run_context`), so a model
left in any state by the previous run — or by a failure — is never trusted.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable
from uuid import UUID


def due_flow_runs(client, deployment_id: UUID) -> list:
    """The deployment's flow runs in a Scheduled state whose start time has come, oldest first."""
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterNextScheduledStartTime, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    now = datetime.now(timezone.utc)
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                                      next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=now)),
        sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC)


def serve_resident(deployment, poll_s: float = 5.0, max_runs: int | None = None,
                   stop: Callable[[], bool] | None = None) -> int:
    """Register ``deployment`` (a ``sequential_edit`` RunnerDeployment) and execute its due flow runs here, one
    at a time, until interrupted, ``max_runs`` have run, or ``stop()`` is true. Returns the runs executed."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from flows.pipeline import sequential_edit

    deployment_id = deployment.apply()
    executed = 0
    with get_client(sync_client=True) as client:
        while (max_runs is None or executed < max_runs) and not (stop and stop()):
            due = due_flow_runs(client, deployment_id)
            if not due:
                time.sleep(poll_s)
                continue
            flow_run = due[0]
            started = time.perf_counter()
            state = run_flow(sequential_edit, flow_run=flow_run, parameters=dict(flow_run.parameters),
                             return_type="state")
            executed += 1
            print(f"flow run {flow_run.name} ({flow_run.id}): {state.type.value.lower()} in "
                  f"{time.perf_counter() - started:.1f} s, in the serving process", flush=True)
    return executed
