"""The serving process runs its scheduled bulk updates itself: two scheduled flow runs, one model load, and each
run restores the run's state from the ledger (hash-verified) before editing the facts ingested since."""

from __future__ import annotations

import json

import pytest
from prefect.deployments import run_deployment

from db.engine import make_engine
from db.history import batches_frame
from db.ingest import ingest_file
from db.migrate import upgrade
from flows.commands.serve import bulk_update_deployment
from flows.model_session import ModelSession
from flows.pipeline import sequential_edit
from flows.resident import serve_resident
from fixtures.data import counterfact_file
from fixtures.runs import SOURCE, tiny_settings

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_two_scheduled_runs_in_one_serving_process_load_the_model_once(tiny_model_folder, tmp_path):
    url = f"sqlite:///{tmp_path / 'bulk.db'}"
    upgrade(url)
    engine = make_engine(url)
    records = json.loads(counterfact_file(12).read_text())
    for part in range(3):
        (tmp_path / f"update-{part}.json").write_text(json.dumps(records[4 * part:4 * part + 4]))
    ingest_file(engine, tmp_path / "update-0.json", source=SOURCE)
    run_id = sequential_edit(settings=tiny_settings(tiny_model_folder).to_dict(), db_url=url)["run_id"]
    ModelSession._loaded.clear()  # a serving process that has not loaded the model yet
    loads = ModelSession.loads
    deployment = bulk_update_deployment(run_id, url, "0 2 * * *", name=f"resident-{run_id}")
    for part in (1, 2):  # tonight's update, tomorrow's
        ingest_file(engine, tmp_path / f"update-{part}.json", source=SOURCE)
        deployment.apply()
        run_deployment(f"sequential_edit/resident-{run_id}", timeout=0)  # what the schedule creates
        assert serve_resident(deployment, poll_s=0.5, max_runs=1) == 1
        assert list(batches_frame(engine, run_id)["status"]) == ["applied"] * (1 + part)
    assert ModelSession.loads - loads == 1
