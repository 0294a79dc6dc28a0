"""What the Prefect server holds of a run, read back through its API as the UI reads it: flow and task runs
named after the ledger's run and batch, seqedit's INFO logs in the flow run's Logs tab, artifacts keyed by the
ledger so that two ledgers on one server do not overwrite each other, and a readable summary with a legend."""

from __future__ import annotations

import asyncio

import pytest

from fixtures.runs import new_tiny_ledger, tiny_settings
from flows.model_session import ModelSession
from flows.pipeline import sequential_edit
from flows.prefect_ui import artifact_key, ledger_tag

pytestmark = pytest.mark.usefixtures("prefect_server")


async def _server_view(tag: str) -> tuple[list, list, list]:
    """(flow runs tagged ``tag``, their task runs, their logs) from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterTags, LogFilter, LogFilterFlowRunId,
                                                TaskRunFilter, TaskRunFilterFlowRunId)

    async with get_client() as client:
        flow_runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
        ids = [flow_run.id for flow_run in flow_runs]
        task_runs = await client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids)))
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200)
    return flow_runs, task_runs, logs


async def _artifacts(key: str) -> list:
    """Every artifact stored under ``key`` (a key names a versioned series: each write adds one)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_flow_runs_task_runs_logs_and_artifacts_are_named_by_the_ledger_run_and_batch(tmp_path, tiny_model_folder):
    ModelSession.unload(tiny_model_folder)  # ledger a's run loads the model, b's finds it loaded
    ledgers = []
    for name in ("a", "b"):  # two ledgers, each with its run 1, on one Prefect server
        folder = tmp_path / name
        folder.mkdir()
        url, engine = new_tiny_ledger(folder, 8)
        settings = tiny_settings(tiny_model_folder, limit=8, eval_every=1)
        assert sequential_edit(settings=settings.to_dict(), db_url=url)["run_id"] == 1
        ledgers.append(engine)
    tags = [ledger_tag(engine) for engine in ledgers]
    assert tags[0] != tags[1]

    flow_runs, task_runs, logs = asyncio.run(_server_view(tags[0]))
    assert [(flow_run.name, "seqedit-run-1" in flow_run.tags) for flow_run in flow_runs] == [
        ("run 1 · sequential edit", True)]
    names = {task_run.name for task_run in task_runs}
    for seq in (1, 2):
        assert {f"apply-edit run 1 batch {seq}", f"commit-batch run 1 batch {seq}",
                f"evaluate run 1 batch {seq}", f"record-full run 1 batch {seq}"} <= names
    messages = "\n".join(log.message for log in logs)
    assert "loading model" in messages and "C0 for layers [1, 2]" in messages  # the first minutes explained
    assert "run 1 batch 2 committed: 4 facts" in messages and "[evaluation @ batch 2] ES" in messages
    messages_b = "\n".join(log.message for log in asyncio.run(_server_view(tags[1]))[2])
    assert "already loaded in this process" in messages_b and "loading model" not in messages_b

    summaries = [asyncio.run(_artifacts(artifact_key(engine, 1, "summary"))) for engine in ledgers]
    assert [len(series) for series in summaries] == [1, 1]  # one each: neither ledger's run 1 replaced the other's
    assert "- `es`: efficacy" in summaries[0][0].data and "- `n_edits`: facts in the model" in summaries[0][0].data
    (metrics,) = asyncio.run(_artifacts(artifact_key(ledgers[0], 1, "metrics")))
    assert '"ns"' in str(metrics.data) and "norm.dw.1" not in str(metrics.data)  # the headline columns only
