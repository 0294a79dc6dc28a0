"""Evaluations, metrics, alarms and the history DataFrames."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from db.errors import BatchStateError
from db.evaluations import AlarmRow, Metric, record_evaluation
from db.history import alarms_frame, batches_frame, edits_for_subject, metrics_frame, runs_frame
from db.ledger import acquire_writer
from fixtures.database import add_facts, apply_and_commit, new_run, random_weights


@pytest.fixture
def run_with_history(database):
    """Four applied batches of two facts, evaluated at 0, 2 and 4, then rolled back to 2."""
    add_facts(database.engine, 8)
    weights = random_weights()
    run = new_run(database.engine, weights, batch_size=2, eval_every=2)
    generator = torch.Generator().manual_seed(0)
    record_evaluation(database.engine, run.id, 0, [("es", 0.1, "edited"), ("ppl", 20.0, "heldout")], duration_s=3.0)
    with acquire_writer(database.engine, run.id) as writer:
        for seq in range(1, 5):
            apply_and_commit(writer, writer.claim_batch(), weights, generator, timings={"solve": 0.5})
            if seq % 2 == 0:
                alarms = [AlarmRow(rule="ppl_ratio", metric="ppl", value=80.0, baseline=20.0, threshold=3.0,
                                   action="rollback", message="perplexity quadrupled")] if seq == 4 else []
                record_evaluation(database.engine, run.id, seq, [
                    Metric("es", seq / 4, "edited"), Metric("ppl", 20.0 * seq, "heldout"),
                    Metric("nm", math.nan, "neighborhood")], alarms=alarms)
        writer.rollback(2, reason="collapse")
    return database, run


def test_metrics_in_long_format(run_with_history):
    database, run = run_with_history
    frame = metrics_frame(database.engine, run.id)
    assert list(frame.columns) == ["run_id", "evaluation_id", "seq", "name", "split", "value", "status", "created_at",
                                   "kind"]
    assert set(frame["kind"]) == {"full"}
    assert list(frame["seq"]) == [0, 0, 2, 2, 2]
    es = frame[frame["name"] == "es"].set_index("seq")["value"]
    assert es.to_dict() == {0: 0.1, 2: 0.5}
    assert math.isnan(frame[frame["name"] == "nm"]["value"].iloc[0]), "NaN survives the round trip"
    assert isinstance(frame["created_at"].dtype, pd.DatetimeTZDtype)
    everything = metrics_frame(database.engine, run.id, include_rolled_back=True)
    assert list(everything[everything["seq"] == 4]["status"]) == ["rolled_back"] * 3


def test_batches_frame_shows_statuses_and_timings(run_with_history):
    database, run = run_with_history
    frame = batches_frame(database.engine, run.id)
    assert list(frame["seq"]) == [1, 2, 3, 4]
    assert list(frame["status"]) == ["applied", "applied", "rolled_back", "rolled_back"]
    assert list(frame["seconds_solve"]) == [0.5] * 4
    assert frame["rolled_back_at"].isna().tolist() == [True, True, False, False]


def test_alarms_are_kept_after_the_rollback_they_caused(run_with_history):
    database, run = run_with_history
    frame = alarms_frame(database.engine, run.id)
    assert len(frame) == 1
    alarm = frame.iloc[0]
    assert (alarm["seq"], alarm["rule"], alarm["action"], alarm["value"], alarm["baseline"]) == \
        (4, "ppl_ratio", "rollback", 80.0, 20.0)


def test_evaluations_need_an_applied_point(run_with_history):
    database, run = run_with_history
    with pytest.raises(BatchStateError, match="no applied batch 3"):
        record_evaluation(database.engine, run.id, 3, [("es", 1.0, "edited")])
    with pytest.raises(BatchStateError):
        record_evaluation(database.engine, run.id, 9, [], alarms=[AlarmRow(rule="r", metric="m", value=1.0,
                                                                         baseline=0.0, threshold=0.5,
                                                                         action="stop", message="")])


def test_edits_for_a_subject_across_runs(run_with_history):
    database, first = run_with_history
    # Facts 5..8 went back to the pool with the rollback; a second run takes them.
    second = new_run(database.engine, random_weights(), batch_size=4)
    with acquire_writer(database.engine, second.id) as writer:
        apply_and_commit(writer, writer.claim_batch(), random_weights(), torch.Generator().manual_seed(1))
    frame = edits_for_subject(database.engine, "Subject 5")
    assert list(zip(frame["run_id"], frame["seq"], frame["batch_status"])) == \
        [(first.id, 3, "rolled_back"), (second.id, 1, "applied")]
    assert set(frame["fact_status"]) == {"applied"}
    assert edits_for_subject(database.engine, "Subject 0")["batch_status"].tolist() == ["applied"]
    assert edits_for_subject(database.engine, "Nobody").empty
    runs = runs_frame(database.engine)
    assert list(runs["run_id"]) == [first.id, second.id] and list(runs["status"]) == ["created"] * 2


def test_frames_of_a_new_run_are_empty_with_their_columns(database):
    run = new_run(database.engine, random_weights())
    batches = batches_frame(database.engine, run.id)
    assert batches.empty and {"seq", "status", "duration_s", "claimed_at"} <= set(batches.columns)
    assert metrics_frame(database.engine, run.id).empty
    assert alarms_frame(database.engine, run.id).empty
