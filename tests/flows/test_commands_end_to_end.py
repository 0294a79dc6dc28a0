"""The commands a user runs, each end to end: eval, history --alarms, rollback --keep-facts-out, --save-model,
the collapse policy that rolls back and continues, the demo, and serve running its deployment once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from db.engine import make_engine
from db.history import batches_frame, facts_frame, metrics_frame
from db.ingest import ingest_file
from db.migrate import upgrade
from db.replay import weights_at
from flows.cli import main
from flows.pipeline import sequential_edit
from fixtures.data import counterfact_file
from fixtures.runs import SOURCE, new_tiny_ledger, tiny_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

RETENTION_ALARM = ["retention.es:below:2"]
"""Fires at every evaluation that has earlier edits to retain (batch 2 on), never at batch 1."""


@pytest.fixture
def twelve_facts(tmp_path):
    return new_tiny_ledger(tmp_path, 12)


def test_a_collapse_rollback_that_continues_goes_on_with_the_next_facts(twelve_facts, tiny_model_folder):
    url, engine = twelve_facts
    settings = tiny_settings(tiny_model_folder, limit=12, eval_every=1,
                             collapse={"action": "rollback", "after_rollback": "continue", "rules": RETENTION_ALARM})
    outcome = sequential_edit(settings=settings.to_dict(), db_url=url)
    # batch 2 alarms twice (facts 5-8, then 9-12), is rolled back to 1 each time, and the run goes on until
    # the facts are used up: completed at batch 1, the rolled-back facts kept out of the pool
    assert (outcome["status"], outcome["seq"]) == ("completed", 1)
    assert list(batches_frame(engine, outcome["run_id"])["status"]) == ["applied", "rolled_back", "rolled_back"]
    statuses = facts_frame(engine).set_index("fact_id")["status"]
    assert list(statuses[:12]) == ["applied"] * 4 + ["rolled_back"] * 8


def test_eval_history_alarms_and_a_rollback_that_keeps_facts_out(twelve_facts, tiny_model_folder, capsys):
    url, engine = twelve_facts
    settings = tiny_settings(tiny_model_folder, limit=12, health_checks=True,  # (its baseline: rules need one)
                             collapse={"action": "warn", "rules": RETENTION_ALARM})
    run_id = sequential_edit(settings=settings.to_dict(), db_url=url)["run_id"]
    capsys.readouterr()
    assert main(["eval", "--db", url, "--run", str(run_id), "--seq", "2", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["retention.es"] <= 1 and "es" in metrics and "ppl.wikitext-2-test" in metrics
    recorded = metrics_frame(engine, run_id, kind="full")
    assert sorted(recorded["seq"].unique()) == [2]  # recorded at the point asked for
    assert main(["history", "--db", url, "--run", str(run_id), "--alarms", "--json"]) == 0
    alarms = json.loads(capsys.readouterr().out)
    assert [(alarm["seq"], alarm["metric"], alarm["rule"]) for alarm in alarms] == [
        (2, "retention.es", "retention.es:below:2")]

    assert main(["rollback", "--db", url, "--run", str(run_id), "--to", "1", "--keep-facts-out"]) == 0
    statuses = facts_frame(engine).set_index("fact_id")["status"]
    assert list(statuses[:12]) == ["applied"] * 4 + ["rolled_back"] * 8  # not back in the queue
    resumed = sequential_edit(run_id=run_id, db_url=url)
    assert resumed["seq"] == 1  # nothing pending in its source: the kept-out facts stay out


def test_save_model_writes_the_runs_last_state_as_a_loadable_folder(twelve_facts, tiny_model_folder, tmp_path):
    url, engine = twelve_facts
    folder = tmp_path / "saved"
    outcome = sequential_edit(settings=tiny_settings(tiny_model_folder, limit=8, save_model=str(folder)).to_dict(),
                              db_url=url)
    weights = load_file(folder / "model.safetensors")
    for layer, weight in weights_at(engine, outcome["run_id"], 2).items():
        assert torch.equal(weights[f"model.layers.{layer}.mlp.down_proj.weight"], weight)
    provenance = json.loads((folder / "seqedit.json").read_text())
    assert (provenance["run_id"], provenance["seq"]) == (outcome["run_id"], 2)


@pytest.mark.smollm
def test_the_demo_runs_edits_reports_and_rolls_back(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--facts", "24", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "layers [3, 4, 5, 6, 7] now hold their state after batch 2" in printed
    assert (out / "seqedit.db").is_file() and (out / "report" / "run-1-metrics.png").is_file()
    engine = make_engine(f"sqlite:///{out / 'seqedit.db'}")
    assert list(batches_frame(engine, 1)["status"]) == ["applied", "applied", "rolled_back"]
    metrics = metrics_frame(engine, 1, kind="full")
    assert sorted(metrics["seq"].unique()) == [0, 2]  # batch 3's final evaluation was rolled back with it
    es = metrics[(metrics["seq"] == 2) & (metrics["name"] == "es")]["value"].item()
    assert es >= 0.75  # SmolLM2 learns most of the 8 facts of batch 2


def test_serve_runs_its_deployment_when_triggered(tiny_model_folder, prefect_server, tmp_path):
    """``seqedit serve`` serving the scheduled bulk update of a run on the test server; a flow run of its
    deployment (as the schedule would start) edits the facts ingested since, then serving stops on SIGTERM."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    url = f"sqlite:///{tmp_path / 'bulk.db'}"
    upgrade(url)
    engine = make_engine(url)
    records = json.loads(counterfact_file(8).read_text())
    for part, chunk in enumerate((records[:4], records[4:8])):
        (tmp_path / f"update-{part}.json").write_text(json.dumps(chunk))
    ingest_file(engine, tmp_path / "update-0.json", source=SOURCE)
    run_id = sequential_edit(settings=tiny_settings(tiny_model_folder).to_dict(), db_url=url)["run_id"]
    ingest_file(engine, tmp_path / "update-1.json", source=SOURCE)  # tonight's update
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--cron", "0 2 * * *", "--run",
                               str(run_id), "--db", url, "--poll", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    name = f"sequential_edit/seqedit-run-{run_id}"
    try:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while True:
                try:
                    client.read_deployment_by_name(name)
                    break
                except Exception:
                    assert server.poll() is None and time.monotonic() < deadline, "serve did not deploy"
                    time.sleep(1)
        flow_run = run_deployment(name, timeout=300)
        assert flow_run.state.is_completed(), flow_run.state
        assert list(batches_frame(engine, run_id)["status"]) == ["applied", "applied"]  # the update, edited
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=120)
    assert f"serving deployment 'seqedit-run-{run_id}'" in output
