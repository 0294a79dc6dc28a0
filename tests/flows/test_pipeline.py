"""The sequential-editing flow end to end on SmolLM2, on SQLite and PostgreSQL.

3 batches of 8 real EMMET edits, evaluated after each; the ledger must hold
exactly what happened; a rollback to batch 1 must give back the weights whose
hash was recorded after batch 1; editing batches 2–3 again must reproduce the
same hashes bit for bit.
"""

from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import func, select

from db.history import batches_frame, facts_frame, metrics_frame
from db.models import WeightDelta
from db.runs import get_run
from flows.model_session import ModelSession
from flows.pipeline import evaluate_run, rollback_run, sequential_edit
from fixtures.runs import SOURCE, fast_settings, ingest_counterfact

pytestmark = pytest.mark.usefixtures("prefect_server")

CF_METRICS = {"es", "ps", "ns", "em", "pm", "nm", "s"}


def _recorded_hashes(engine, run_id: int) -> pd.DataFrame:
    """(batch id, seq, status, layer, sha256 after) of every delta of the run."""
    frame = batches_frame(engine, run_id)[["batch_id", "seq", "status"]]
    with engine.connect() as connection:
        rows = connection.execute(select(WeightDelta.batch_id, WeightDelta.layer, WeightDelta.sha256_after)).all()
    deltas = pd.DataFrame(rows, columns=["batch_id", "layer", "sha256"]).astype({"batch_id": "Int64"})
    return frame.merge(deltas, on="batch_id")


def test_three_batches_rollback_and_deterministic_replay(database):
    engine = database.engine
    ingest_counterfact(engine)
    outcome = sequential_edit(settings=fast_settings(limit=24).to_dict(), db_url=database.url)
    run_id = outcome["run_id"]
    assert (outcome["status"], outcome["seq"]) == ("completed", 3)

    batches = batches_frame(engine, run_id)
    assert list(batches["seq"]) == [1, 2, 3] and set(batches["status"]) == {"applied"}
    assert list(batches["n_facts"]) == [8, 8, 8]
    assert {"seconds_keys", "seconds_v_star", "seconds_solve", "seconds_edit"} <= set(batches.columns)
    facts = facts_frame(engine, source=SOURCE)
    assert (facts["status"] == "applied").sum() == 24 and list(facts.loc[facts["status"] == "applied", "fact_id"]) \
        == list(range(1, 25))
    hashes = _recorded_hashes(engine, run_id)
    assert sorted(zip(hashes["seq"], hashes["layer"])) == [(seq, layer) for seq in (1, 2, 3) for layer in (3, 4)]
    assert hashes.groupby("seq")["sha256"].nunique().tolist() == [2, 2, 2]  # two layers, two different matrices

    metrics = metrics_frame(engine, run_id)
    assert sorted(metrics["seq"].unique()) == [0, 1, 2, 3]
    per_point = metrics.groupby("seq")["name"].apply(set)
    for seq in (1, 2, 3):
        assert CF_METRICS | {"ge", "ppl.wikitext-2-test", "acc.sst2", "norm.dw.3", "norm.w.4"} <= per_point[seq]
    assert not CF_METRICS & per_point[0]  # the baseline has no batch to score
    values = metrics.pivot_table(index="seq", columns="name", values="value")
    # retention is about *earlier* edits: none at batch 1, batch 1's facts at 2, batches 1-2's at 3
    assert not {name for name in per_point[1] if name.startswith("retention.")}
    assert (values.loc[2, "retention.n_facts"], values.loc[3, "retention.n_facts"]) == (8, 16)
    # every layer's memorization is recorded with its batch (exact EMMET writes almost all of its residual)
    for layer in (3, 4):
        assert batches[f"memorization_{layer}"].between(0.5, 1.0 + 1e-9).all(), batches
    assert values.loc[0, "norm.dw.3"] == 0.0 and values.loc[3, "norm.dw.3"] > values.loc[1, "norm.dw.3"] > 0
    assert values.loc[1, "es"] >= 0.5  # eight real edits mostly took (6 v* steps)
    final = hashes[hashes["seq"] == 3].set_index("layer")["sha256"].to_dict()
    assert outcome["weights_sha256"] == final

    after_1 = hashes[hashes["seq"] == 1].set_index("layer")["sha256"].to_dict()
    rolled = rollback_run(run_id=run_id, to_seq=1, db_url=database.url)
    assert rolled["weights_sha256"] == after_1
    session = ModelSession.loaded(None)
    assert session.adapter.weights_sha256([3, 4]) == after_1  # the loaded model was put back too
    assert list(batches_frame(engine, run_id)["status"]) == ["applied", "rolled_back", "rolled_back"]
    assert set(metrics_frame(engine, run_id)["seq"]) == {0, 1}
    assert (facts_frame(engine, source=SOURCE)["status"] == "applied").sum() == 8

    again = sequential_edit(run_id=run_id, db_url=database.url)
    assert (again["status"], again["seq"]) == ("completed", 3)
    replayed = _recorded_hashes(engine, run_id)
    active = replayed[replayed["status"] == "applied"]
    rolled_back = replayed[replayed["status"] == "rolled_back"]
    for seq in (2, 3):
        first = rolled_back[rolled_back["seq"] == seq].set_index("layer")["sha256"].to_dict()
        second = active[active["seq"] == seq].set_index("layer")["sha256"].to_dict()
        assert first == second, f"batch {seq} did not reproduce its weights"
    assert again["weights_sha256"] == final
    assert get_run(engine, run_id).status == "completed"

    # evaluate any recorded point: batch 1 is restored first, then measured and recorded at seq 1
    measured = evaluate_run(run_id=run_id, seq=1, db_url=database.url)
    assert session.adapter.weights_sha256([3, 4]) == after_1
    recorded = metrics_frame(engine, run_id)
    at_1 = recorded[recorded["seq"] == 1]
    assert at_1["evaluation_id"].nunique() == 2
    assert measured["norm.dw.3"] == pytest.approx(values.loc[1, "norm.dw.3"], rel=1e-6)
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(WeightDelta)).scalar_one() == 10
