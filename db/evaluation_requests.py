"""Evaluation requests: evaluation points run by other processes, tracked so none is lost or done twice.

With ``eval_mode: async`` the editing loop does not evaluate; it records a
request for the batch (:func:`request_evaluation`) and submits a flow run of
the ``evaluate`` flow to a Prefect work pool. A worker claims the request
(:func:`claim_request`: ``pending`` → ``running`` with a lease it renews),
evaluates, and records the metrics, its alarms and ``done`` in one transaction
(:func:`db.evaluations.record_evaluation` with ``request=``). Whatever happens
to a worker, the ledger says which points still need an evaluation
(:func:`open_requests`): one whose lease ran out, whose flow run died or failed
is claimed again; a late finisher whose claim was taken over records nothing
(:class:`db.errors.RequestLostError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, or_, select, update
from sqlalchemy.orm import Session

from db.engine import transaction
from db.errors import BatchStateError, RequestLostError
from db.models import BatchRecord, BatchStatus, EvaluationRequest, RequestStatus, utcnow
from db.runs import load_run


@dataclass(frozen=True)
class RequestInfo:
    id: int
    run_id: int
    batch_id: int
    seq: int
    status: RequestStatus
    attempts: int
    flow_run_id: str | None
    worker: str | None
    lease_until: datetime | None
    evaluation_id: int | None
    error: str | None

    def lease_expired(self, now: datetime | None = None) -> bool:
        return self.status == RequestStatus.RUNNING and (self.lease_until is None or
                                                           self.lease_until < (now or utcnow()))


def _info(request: EvaluationRequest, seq: int) -> RequestInfo:
    return RequestInfo(request.id, request.run_id, request.batch_id, seq, request.status, request.attempts,
                       request.flow_run_id, request.worker, request.lease_until, request.evaluation_id, request.error)


def _applied_batch(session: Session, run_id: int, seq: int) -> int:
    batch_id = session.scalar(select(BatchRecord.id).where(
        BatchRecord.run_id == run_id, BatchRecord.seq == seq, BatchRecord.status == BatchStatus.APPLIED))
    if batch_id is None:
        raise BatchStateError(f"run {run_id} has no applied batch {seq} to evaluate")
    return batch_id


def request_evaluation(engine: Engine, run_id: int, seq: int) -> RequestInfo:
    """The open (or done) request for applied batch ``seq``, created ``pending`` if there is none."""
    with transaction(engine, write=True) as session:
        load_run(session, run_id)
        batch_id = _applied_batch(session, run_id, seq)
        request = session.scalar(select(EvaluationRequest).where(
            EvaluationRequest.batch_id == batch_id, EvaluationRequest.status != RequestStatus.FAILED))
        if request is None:
            request = EvaluationRequest(run_id=run_id, batch_id=batch_id, status=RequestStatus.PENDING, attempts=0)
            session.add(request)
            session.flush()
        return _info(request, seq)


def set_flow_run(engine: Engine, request_id: int, flow_run_id: str) -> None:
    """Note the flow run submitted for the request (to ask Prefect about it later)."""
    with transaction(engine, write=True) as session:
        session.execute(update(EvaluationRequest).where(EvaluationRequest.id == request_id)
                        .values(flow_run_id=flow_run_id, updated_at=utcnow()))


def claim_request(engine: Engine, request_id: int, worker: str, lease_s: float) -> RequestInfo | None:
    """Take the request for ``worker`` until ``lease_s`` seconds from now; None if it is done, held by a live
    lease, failed, or its batch was rolled back meanwhile (then nothing is left to evaluate)."""
    now = utcnow()
    with transaction(engine, write=True) as session:
        row = session.execute(select(EvaluationRequest, BatchRecord.seq, BatchRecord.status)
                              .join(BatchRecord, EvaluationRequest.batch_id == BatchRecord.id)
                              .where(EvaluationRequest.id == request_id).with_for_update()).one_or_none()
        if row is None:
            return None
        request, seq, batch_status = row
        if batch_status != BatchStatus.APPLIED or request.status in (RequestStatus.DONE, RequestStatus.FAILED):
            return None
        if request.status == RequestStatus.RUNNING and request.lease_until is not None and request.lease_until > now:
            return None
        request.status = RequestStatus.RUNNING
        request.attempts += 1
        request.worker = worker
        request.lease_until = now + timedelta(seconds=lease_s)
        request.updated_at = now
        session.flush()
        return _info(request, seq)


def renew_lease(engine: Engine, request_id: int, worker: str, lease_s: float) -> bool:
    """Extend ``worker``'s lease; False if the request is no longer ``worker``'s (taken over or finished)."""
    now = utcnow()
    with transaction(engine, write=True) as session:
        return session.execute(update(EvaluationRequest).where(
            EvaluationRequest.id == request_id, EvaluationRequest.status == RequestStatus.RUNNING,
            EvaluationRequest.worker == worker).values(lease_until=now + timedelta(seconds=lease_s),
                                                       updated_at=now)).rowcount == 1


def complete_request(session: Session, request_id: int, worker: str, evaluation_id: int) -> None:
    """Mark the request ``done`` with its evaluation, inside the transaction that records the evaluation."""
    finished = session.execute(update(EvaluationRequest).where(
        EvaluationRequest.id == request_id, EvaluationRequest.status == RequestStatus.RUNNING,
        EvaluationRequest.worker == worker).values(status=RequestStatus.DONE, evaluation_id=evaluation_id,
                                                   lease_until=None, updated_at=utcnow())).rowcount
    if finished != 1:
        raise RequestLostError(f"evaluation request {request_id} is no longer held by {worker} "
                               "(its lease ran out and another worker took it, or it is done)")


def fail_request(engine: Engine, request_id: int, worker: str, error: str) -> None:
    """The worker's evaluation raised: the request is ``failed`` (the batch may be requested again)."""
    with transaction(engine, write=True) as session:
        session.execute(update(EvaluationRequest).where(
            EvaluationRequest.id == request_id, EvaluationRequest.status == RequestStatus.RUNNING,
            EvaluationRequest.worker == worker).values(status=RequestStatus.FAILED, error=error[:4000],
                                                       lease_until=None, updated_at=utcnow()))


def open_requests(engine: Engine, run_id: int) -> list[RequestInfo]:
    """The run's requests for applied batches that are not done (pending, running, or failed with no newer
    request), oldest batch first."""
    with transaction(engine) as session:
        newer = select(EvaluationRequest.id).where(
            EvaluationRequest.batch_id == BatchRecord.id,
            EvaluationRequest.status != RequestStatus.FAILED).correlate(BatchRecord).exists()
        rows = session.execute(
            select(EvaluationRequest, BatchRecord.seq)
            .join(BatchRecord, EvaluationRequest.batch_id == BatchRecord.id)
            .where(EvaluationRequest.run_id == run_id, BatchRecord.status == BatchStatus.APPLIED,
                   or_(EvaluationRequest.status.in_((RequestStatus.PENDING, RequestStatus.RUNNING)),
                       and_(EvaluationRequest.status == RequestStatus.FAILED, ~newer)))
            .order_by(BatchRecord.seq, EvaluationRequest.id)).all()
        return [_info(request, seq) for request, seq in rows]
