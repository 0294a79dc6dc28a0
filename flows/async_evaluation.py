"""Evaluation beside editing: evaluation points as flow runs of the ``evaluate`` flow on a Prefect work pool.

With ``eval_mode: async`` the editing loop does not stop to evaluate. At each
evaluation point it records an evaluation request in the ledger and submits a
flow run of the ``evaluate`` deployment (``eval_deployment``) — Prefect's work
pool hands it to a worker, which restores that point from the ledger into its
own copy of the model (hash-verified), evaluates, and records metrics, alarms
and the request's completion in one transaction. Between batches, and until all
points are in at the end, the loop:

* acts on alarms that arrived (:meth:`AsyncEvaluations.poll`): the collapse
  policy rolls the run back to the last healthy point *at or before the
  alarmed batch*, however far the run has gone since;
* resubmits what was lost: a request whose flow run failed, crashed, was
  cancelled or vanished before it finished, or whose worker stopped renewing
  its lease (a killed worker), up to ``eval_max_attempts`` claims.

Nothing is evaluated twice: a request is ``done`` in the transaction that
records its metrics, and a worker whose claim was taken over records nothing.
The worker side is :class:`Lease` and :func:`claim`, used by the ``evaluate``
flow when it is given a request.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import Engine

from db.engine import absolute_url
from db.evaluation_requests import (RequestInfo, claim_request, open_requests, renew_lease, request_evaluation,
                                    set_flow_run)
from db.history import alarms_frame
from db.models import RequestStatus

log = logging.getLogger(__name__)

FINISHED_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED", "CANCELLING")
"""Flow-run states after which a request that is still not done needs a new flow run."""


def worker_name() -> str:
    """Who holds a claim: host, process and flow run (several workers may share a host)."""
    from prefect.runtime import flow_run

    return f"{socket.gethostname()}:{os.getpid()}:{flow_run.get_id() or '-'}"


def claim(engine: Engine, request_id: int, lease_s: float) -> tuple[RequestInfo, str] | None:
    """The worker's claim on a request (and its worker name), or None when there is nothing to do."""
    worker = worker_name()
    request = claim_request(engine, request_id, worker, lease_s)
    return None if request is None else (request, worker)


class Lease:
    """Renews a worker's claim every third of ``lease_s`` while the evaluation runs (a daemon thread), so
    that only a worker that died — or hangs — lets its lease run out."""

    def __init__(self, engine: Engine, request_id: int, worker: str, lease_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, args=(engine, request_id, worker, lease_s), daemon=True)

    def _renew(self, engine: Engine, request_id: int, worker: str, lease_s: float) -> None:
        while not self._stop.wait(lease_s / 3):
            if not renew_lease(engine, request_id, worker, lease_s):
                log.warning("evaluation request %d is no longer held by %s", request_id, worker)
                return

    def __enter__(self) -> "Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class AsyncEvaluations:
    """The editing loop's side: submit evaluation points, watch them, act on their alarms."""

    engine: Engine
    run_id: int
    deployment: str
    lease_s: float
    max_attempts: int
    on_alarm: Callable[[int], bool]
    """Applies the collapse policy to an alarm at a batch; True when the run must stop."""
    handled_alarm: int = field(default=-1)
    """The highest alarm id already acted upon (alarms raised before this process started count as handled)."""

    def __post_init__(self) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(self.deployment)  # a clear error now rather than at the first point
        alarms = alarms_frame(self.engine, self.run_id)
        if self.handled_alarm < 0:
            self.handled_alarm = int(alarms["alarm_id"].max()) if not alarms.empty else 0

    def submit(self, seq: int) -> None:
        """Request an evaluation of batch ``seq`` and submit a flow run for it (unless it is done already)."""
        request = request_evaluation(self.engine, self.run_id, seq)
        if request.status != RequestStatus.DONE:
            self._submit(request)

    def _submit(self, request: RequestInfo) -> None:
        from prefect.deployments import run_deployment

        url = absolute_url(self.engine.url)
        flow_run = run_deployment(self.deployment, parameters={"run_id": self.run_id, "seq": request.seq,
                                                               "db_url": url, "request_id": request.id},
                                  timeout=0, as_subflow=False, tags=["seqedit", "evaluation"])
        set_flow_run(self.engine, request.id, str(flow_run.id))
        log.info("submitted evaluation of run %d at batch %d (request %d, flow run %s)", self.run_id, request.seq,
                 request.id, flow_run.id)

    def poll(self) -> bool:
        """Act on new alarms (True: the run must stop) and resubmit lost evaluations; does not wait."""
        alarms = alarms_frame(self.engine, self.run_id)
        fresh = alarms[alarms["alarm_id"] > self.handled_alarm].sort_values("seq") if not alarms.empty else alarms
        if not fresh.empty:
            self.handled_alarm = int(alarms["alarm_id"].max())
            if self.on_alarm(int(fresh["seq"].iloc[0])):
                return True
        for request in open_requests(self.engine, self.run_id):
            if self._lost(request):
                if request.attempts >= self.max_attempts:
                    raise RuntimeError(f"the evaluation of run {self.run_id} at batch {request.seq} failed "
                                       f"{request.attempts} times (last error: {request.error})")
                if request.status == RequestStatus.FAILED:
                    request = request_evaluation(self.engine, self.run_id, request.seq)
                print(f"resubmitting the evaluation of batch {request.seq} (request {request.id}, "
                      f"{request.attempts} attempts so far)", flush=True)
                self._submit(request)
        return False

    def drain(self, timeout_s: float, interval_s: float = 2.0) -> bool:
        """Poll until every open evaluation is in (True: an alarm stopped the run); raises after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.poll():
                return True
            remaining = open_requests(self.engine, self.run_id)
            if not remaining:
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"evaluations of run {self.run_id} at batches {[r.seq for r in remaining]} "
                                   f"were not in after {timeout_s:.0f} s; `seqedit eval --run {self.run_id} --seq N` "
                                   "evaluates a point by hand")
            time.sleep(interval_s)

    def _lost(self, request: RequestInfo) -> bool:
        """A request no live worker will finish: failed, lease run out, or its flow run over or gone."""
        if request.status == RequestStatus.FAILED or request.lease_expired():
            return True
        if request.status == RequestStatus.RUNNING:  # a worker holds a live lease
            return False
        if request.flow_run_id is None:  # the submission itself was interrupted
            return True
        return self._flow_run_state(request.flow_run_id) in (None, *FINISHED_STATES)

    @staticmethod
    def _flow_run_state(flow_run_id: str) -> str | None:
        """The flow run's state type, None if Prefect no longer knows it."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(flow_run_id).state
        except ObjectNotFound:
            return None
        return None if state is None else state.type.value
