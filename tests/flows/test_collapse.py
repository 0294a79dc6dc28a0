"""Collapse detection: rules, the last healthy point, and a destructive run rolled back on SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from db.evaluations import AlarmRow, record_evaluation
from db.history import alarms_frame, batches_frame, facts_frame, metrics_frame
from db.ledger import acquire_writer
from db.runs import get_run
from flows.collapse import CollapsePolicy, CollapseRule, detect, last_healthy_seq
from flows.model_session import ModelSession
from flows.pipeline import sequential_edit
from fixtures.database import add_facts, apply_and_commit, new_run, random_weights
from fixtures.runs import SOURCE, fast_settings, ingest_counterfact


# -- rules -----------------------------------------------------------------------------------
def test_rules_compare_with_the_baseline():
    baseline = {"acc.sst2": 0.80, "acc.cola": 0.60, "ppl.wikitext": 20.0, "ge": 5.0, "retention.es": 1.0}
    metrics = {"acc.sst2": 0.60, "acc.cola": 0.55, "ppl.wikitext": 45.0, "ge": 4.0, "retention.es": 0.4}
    rules = (CollapseRule.parse("acc.*:drop:0.15"), CollapseRule.parse("ppl.*:ratio:2"),
             CollapseRule.parse("ge:drop:1.5"), CollapseRule.parse("retention.es:below:0.5"))
    fired = {(alarm.rule.describe(), alarm.metric): alarm for alarm in detect(metrics, baseline, rules)}
    assert set(fired) == {("acc.*:drop:0.15", "acc.sst2"), ("ppl.*:ratio:2", "ppl.wikitext"),
                          ("retention.es:below:0.5", "retention.es")}
    alarm = fired[("ppl.*:ratio:2", "ppl.wikitext")]
    assert (alarm.value, alarm.baseline) == (45.0, 20.0) and "45" in alarm.message
    assert detect(baseline, baseline, rules) == []


@pytest.mark.parametrize("text, problem", [("ppl.*:ratio", "METRIC:TEST:THRESHOLD"), ("ppl.*:grows:2", "unknown test"),
                                           ("ppl.*:ratio:two", "could not convert")])
def test_malformed_rules_are_rejected_by_name(text, problem):
    with pytest.raises(ValueError, match=problem) as error:
        CollapseRule.parse(text)
    assert text.split(":")[0] in str(error.value)


def test_policies_round_trip_and_reject_unknown_actions():
    policy = CollapsePolicy(action="rollback", after_rollback="continue", rules=(CollapseRule("ge", "drop", 1.0),))
    assert CollapsePolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(ValueError, match="explode"):
        CollapsePolicy(action="explode")


# -- the last healthy point, on the real ledger ----------------------------------------------
def test_the_last_healthy_point_is_the_latest_evaluated_batch_without_alarms(database):
    engine = database.engine
    add_facts(engine, 10)
    weights = random_weights()
    run = new_run(engine, weights, batch_size=2)
    generator = torch.Generator().manual_seed(0)
    with acquire_writer(engine, run.id) as writer:
        for _ in range(5):
            apply_and_commit(writer, writer.claim_batch(), weights, generator)
    for seq in (0, 2, 4, 5):
        alarms = [AlarmRow(rule="ppl.*:ratio:2", metric="ppl.x", value=30.0, baseline=10.0, threshold=2.0,
                           action="rollback", message="test")] if seq >= 4 else []
        record_evaluation(engine, run.id, seq, [("ppl.x", 10.0 + seq)], alarms=alarms)
    assert last_healthy_seq(engine, run.id, up_to=5) == 2  # 3 was never evaluated; 4 and 5 alarmed
    assert last_healthy_seq(engine, run.id, up_to=1) == 0
    alarms = alarms_frame(engine, run.id)
    assert list(alarms["seq"]) == [4, 5] and list(alarms["value"]) == [30.0, 30.0]


# -- a destructive run on SmolLM2 -------------------------------------------------------------
DESTRUCTIVE_EDIT = {"values.lr": 50.0, "values.clamp_norm_factor": 1000.0, "values.weight_decay": 0.0,
                    "values.kl_factor": 0.0, "values.loss_threshold": 0.0, "objective.mom2_update_weight": 1.0}
"""Adam moves every coordinate of δ by about ``lr`` per step: with lr 50 and no effective clamp the
target residuals end up hundreds of times the hidden state's norm, and a weakly preserved update
(λ = 1 instead of 15,000) writes them into the layers."""


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_a_destructive_run_trips_the_detector_and_is_rolled_back(database):
    engine = database.engine
    ingest_counterfact(engine)
    settings = fast_settings(edit_overrides={**fast_settings().edit_overrides, **DESTRUCTIVE_EDIT}, limit=16,
                             collapse={"action": "rollback", "after_rollback": "stop"})  # the default rules
    outcome = sequential_edit(settings=settings.to_dict(), db_url=database.url)
    run = get_run(engine, outcome["run_id"])
    assert outcome["status"] == "stopped" and run.status == "stopped"

    alarms = alarms_frame(engine, run.id)
    assert not alarms.empty and set(alarms["action"]) == {"rollback"}
    fired = alarms.set_index("metric")
    assert "ppl.wikitext-2-test" in fired.index, alarms
    ppl = fired.loc["ppl.wikitext-2-test"]
    assert ppl["value"] > 2 * ppl["baseline"] and math.isfinite(ppl["baseline"])
    assert alarms["evaluation_id"].notna().all() and set(alarms["seq"]) == {1}

    # the run was restored to the last healthy evaluation: here the baseline, before any edit
    assert outcome["seq"] == 0
    assert outcome["weights_sha256"] == run.original_sha256
    assert ModelSession.loaded(None).adapter.weights_sha256(list(run.layers)) == run.original_sha256
    batches = batches_frame(engine, run.id)
    assert set(batches["status"]) == {"rolled_back"} and set(batches["rolled_back_to"]) == {0}
    assert set(metrics_frame(engine, run.id)["seq"]) == {0}  # the collapsed evaluation is marked rolled back
    offending = facts_frame(engine, source=SOURCE)
    assert (offending["status"] == "rolled_back").sum() == batches["n_facts"].sum()


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_the_health_check_catches_a_disabling_batch_between_evaluation_points(database):
    """Evaluation only every 3 batches, but the health check after batch 1 sees the damage at once."""
    engine = database.engine
    ingest_counterfact(engine)
    settings = fast_settings(edit_overrides={**fast_settings().edit_overrides, **DESTRUCTIVE_EDIT}, limit=24,
                             eval_every=3, collapse={"action": "stop"})
    outcome = sequential_edit(settings=settings.to_dict(), db_url=database.url)
    assert (outcome["status"], outcome["seq"]) == ("stopped", 1)
    alarms = alarms_frame(engine, outcome["run_id"])
    assert set(alarms["seq"]) == {1}
    fired = set(alarms["metric"])
    assert "ppl.probe" in fired and any(metric.startswith("norm.w.") for metric in fired), fired
    health = metrics_frame(engine, outcome["run_id"], kind="health")
    assert sorted(health["seq"].unique()) == [1]
    at_1 = health.set_index("name")["value"]
    assert at_1["norm.batch_dw.3"] > 0 and at_1["vstar.steps"] >= 1 and at_1["norm.rel_dw.4"] > 0.5
    baseline = metrics_frame(engine, outcome["run_id"], kind="full")
    assert "ppl.probe" in set(baseline[baseline["seq"] == 0]["name"])  # the probe's baseline is the seq-0 point
