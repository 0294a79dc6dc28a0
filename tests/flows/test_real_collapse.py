"""A real sequential run on SmolLM2 trips the collapse detector by itself.

Nothing is destroyed on purpose: ROME, one fact per batch, the SmolLM2 hparams as shipped (v* without
context prefixes, as in the lifelong study), the first facts of ``counterfact-easyedit-edit.json`` in
order, the default collapse rules and the health check after every batch. In the lifelong study
(issue 11's note; now ``studies/lifelong.yaml``) this run's first alarm came at edit 113: each rank-one
ROME update adds a ‖ΔW‖ of ~16 to layer 6's down-projection (‖W0‖ ≈ 176) in a new direction, so
‖W‖ grows like √n until ``norm.w.6`` = 263.9 tripped ``norm.w.*:ratio:1.5``. The damage was real by
then: the perplexity probe up 15 % (43.2 → 49.6), generation entropy down 1.2 bits at edit 100 (5.17 →
3.97, repetitive text), while every edit still held (ES and retention 1.0). The run is given a margin
beyond that edit and must stop there, on its own, with the alarm recorded against the batch that made it.
Minutes on the 2-core CPU: marked ``slow`` (``pytest -m slow``).
"""

from __future__ import annotations

import pytest

from db.history import alarms_frame, batches_frame, metrics_frame
from db.ingest import ingest_file
from flows.pipeline import sequential_edit
from flows.settings import RunSettings
from fixtures.data import dataset_path

pytestmark = [pytest.mark.slow, pytest.mark.smollm, pytest.mark.usefixtures("prefect_server")]

FIRST_ALARM = 113
"""The edit at which the study's ROME run raised its first alarm (issue 11's note; now studies/lifelong.yaml)."""
MARGIN = 20
"""Edits allowed beyond it: the threshold is crossed by a random walk of norms, not at a fixed edit."""


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_sequential_rome_on_smollm2_trips_the_detector_by_itself(database):
    engine = database.engine
    ingest_file(engine, dataset_path("counterfact-easyedit-edit"), source="cf-edit")
    settings = RunSettings.from_dict({
        "algorithm": "rome", "batch_size": 1, "eval_every": 0, "fact_source": "cf-edit", "fact_pool": "private",
        "limit": FIRST_ALARM + MARGIN, "edit_overrides": {"values.n_prefixes": 0}, "collapse": {"action": "stop"},
        "checkpoint_every": 50})
    outcome = sequential_edit(settings=settings.to_dict(), db_url=database.url)
    assert outcome["status"] == "stopped", outcome
    run_id, stopped_at = outcome["run_id"], outcome["seq"]
    alarms = alarms_frame(engine, run_id)
    assert set(alarms["seq"]) == {stopped_at}, "the first alarm stops the run at the batch that raised it"
    assert FIRST_ALARM - MARGIN < stopped_at < FIRST_ALARM + MARGIN  # the slow drift, not a freak first edit
    health = metrics_frame(engine, run_id, kind="health").pivot_table(index="seq", columns="name", values="value")
    # every edit had its health check; without full evaluations (eval_every 0) seq 0's is the baseline
    assert list(health.index) == list(range(0, stopped_at + 1))
    fired = alarms.iloc[0]
    assert fired["metric"] == "norm.w.6" and fired["value"] > 1.5 * fired["baseline"]
    assert fired["baseline"] == pytest.approx(health.loc[0, "norm.w.6"])
    assert (health["norm.w.6"].diff().dropna() > 0).mean() > 0.9, "the edited matrix grows with nearly every edit"
    assert health.loc[stopped_at, "ppl.probe"] > 1.1 * health.loc[0, "ppl.probe"], "and the model got worse"
    applied = batches_frame(engine, run_id)
    assert int((applied["status"] == "applied").sum()) == stopped_at  # the alarming batch stays, for audit
