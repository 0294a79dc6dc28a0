"""What the Prefect UI shows of seqedit's work: its names, its logs and its artifacts' keys.

Prefect names a flow run ``esoteric-camel`` and a task run ``apply-edit-087`` unless told otherwise, and keys
artifacts by a string shared by every ledger on one server. Here each flow run is renamed, once the run it
works on is known (a new run's id exists only after it is created), to ``run 7 · sequential edit`` and tagged
``seqedit-run-7`` and ``ledger-<id>``; task runs are named by templates of their parameters (``apply-edit run
7 batch 3``, :data:`TASK_NAMES`); artifact keys start with the ledger's id (:func:`artifact_key`), so two
ledgers' ``run-1-summary`` are two artifacts; seqedit's own logs go to the flow run's Logs tab
(:func:`send_logs_to_prefect`).
"""

from __future__ import annotations

import logging
from functools import lru_cache

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)

TASK_NAMES = {
    "claim-batch": "claim-batch run {writer.run.id}",
    "apply-edit": "apply-edit run {context.run.id} batch {batch.seq}",
    "commit-batch": "commit-batch run {context.run.id} batch {batch.seq}",
    "evaluate-model": "evaluate run {context.run.id} batch {seq}",
    "record-evaluation": "record-{kind} run {context.run.id} batch {seq}",
}
"""Task-run name templates (Prefect formats them with the task's parameters, attributes included)."""


@lru_cache(maxsize=16)
def _ledger_id(engine: Engine) -> str:
    with engine.connect() as connection:
        return connection.execute(text("SELECT ledger_id FROM ledger_identity")).scalar_one()


def ledger_tag(engine: Engine) -> str:
    """``ledger-`` and the first 12 hex digits of the ledger's random id (migration 0008)."""
    return "ledger-" + _ledger_id(engine).replace("-", "")[:12]


def artifact_key(engine: Engine, run_id: int, what: str) -> str:
    """``ledger-<id>-run-<N>-<what>``: lower-case letters, digits and dashes, as Prefect requires."""
    return f"{ledger_tag(engine)}-run-{run_id}-{what}"


def edit_flow_run_name() -> str:
    """The name ``sequential_edit``'s flow run starts with, before its run exists: ``run 7 · resume``, or
    ``new run · <name or objective>`` (renamed ``run 8 · sequential edit`` once created)."""
    from prefect.runtime import flow_run

    from flows.settings import RunSettings

    parameters = flow_run.parameters
    if parameters.get("run_id") is not None:
        return f"run {parameters['run_id']} · resume"
    settings = parameters.get("settings") or {}
    return f"new run · {settings.get('name') or settings.get('algorithm') or RunSettings.algorithm}"


def name_flow_run(engine: Engine, run_id: int, what: str) -> None:
    """Rename the current flow run ``run <N> · <what>`` and tag it with the run and the ledger. Outside a flow
    run (a plain function call) it does nothing; a server that refuses is logged, never fatal: the name is a
    convenience of the UI, the ledger is the record."""
    from prefect.runtime import flow_run

    flow_run_id = flow_run.get_id()
    if flow_run_id is None:
        return
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run_id)
            tags = sorted({*current.tags, f"seqedit-run-{run_id}", ledger_tag(engine)})
            client.update_flow_run(flow_run_id, name=f"run {run_id} · {what}", tags=tags)
    except Exception:  # noqa: BLE001 — see the docstring
        log.warning("could not name flow run %s after run %d", flow_run_id, run_id, exc_info=True)


SEQEDIT_LOGGERS = ("editing", "flows", "db")


def send_logs_to_prefect() -> None:
    """seqedit's INFO logs — the model loading, C0 computed or read from the cache, v*, each batch committed,
    each evaluation's summary, every warning — in the Logs tab of the flow run they happen in.

    Prefect's API handler is attached to seqedit's own loggers (at INFO) rather than listing them as Prefect's
    "extra loggers", which would also attach Prefect's console handler and print each line twice; what reaches
    the terminal stays the command line's choice (warnings, or everything with ``-v``). Outside a flow run
    the handler drops the record (``PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW=ignore``, set in :mod:`flows`)."""
    from prefect.logging.handlers import APILogHandler

    for name in SEQEDIT_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
            logger.addHandler(APILogHandler(level=logging.INFO))
