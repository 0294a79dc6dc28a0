"""The audit commands on real runs of a tiny random Llama: ``identify`` from weights alone, ``retract`` as a branch
that recomputes the later batches, supersession through two ingests, and the subject timeline."""

from __future__ import annotations

import json
import pytest
import torch
from sqlalchemy import select

from db.audit import verify_run
from db.engine import transaction
from db.history import runs_frame, run_facts_frame, subject_timeline
from db.ingest import ingest_records
from db.models import BatchRecord, FactRecord
from db.readers import SourceRecord
from db.replay import weights_at
from flows.cli import main
from flows.model_export import export_model
from flows.pipeline import sequential_edit
from fixtures.runs import tiny_settings

pytestmark = pytest.mark.usefixtures("prefect_server")


def _chains(engine, run_id: int) -> list[tuple[int, str, str]]:
    with transaction(engine) as session:
        return [tuple(row) for row in session.execute(
            select(BatchRecord.seq, BatchRecord.status, BatchRecord.chain_sha256)
            .where(BatchRecord.run_id == run_id).order_by(BatchRecord.id))]


def test_identify_names_the_batch_of_an_export_the_original_and_an_unrelated_model(tiny_ledger, tiny_model_folder,
                                                                                   tmp_path, capsys):
    url, engine = tiny_ledger
    run_id = sequential_edit(settings=tiny_settings(tiny_model_folder, limit=8).to_dict(), db_url=url)["run_id"]
    exported = export_model(engine, run_id, 1, tmp_path / "export")
    (exported / "seqedit.json").unlink()  # identify never reads it
    assert main(["identify", str(exported), "--db", url]) == 0
    assert capsys.readouterr().out.strip().endswith(f"run {run_id} batch 1")
    assert main(["identify", tiny_model_folder, "--db", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"].endswith(f"the unedited model of run {run_id}")
    other = tmp_path / "other"  # the same architecture, other weights: someone's fine-tune
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.01)
    model.save_pretrained(other)
    assert main(["identify", str(other), "--db", url]) == 1
    assert capsys.readouterr().out.strip().endswith("not from this ledger")


def test_retract_branches_before_the_fact_and_recomputes_the_later_batches(tiny_ledger, tiny_model_folder, capsys):
    url, engine = tiny_ledger
    parent = sequential_edit(settings=tiny_settings(tiny_model_folder, limit=12).to_dict(), db_url=url)["run_id"]
    before = _chains(engine, parent)
    facts = run_facts_frame(engine, parent)
    wrong = int(facts[facts["seq"] == 2]["fact_id"].iloc[1])
    assert main(["retract", "--run", str(parent), "--fact", str(wrong), "--reason", "wrong source", "--db", url,
                 "--json"]) == 0
    outcome = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    branch = outcome["run_id"]
    assert (outcome["parent_seq"], outcome["status"]) == (1, "completed")
    assert _chains(engine, parent) == before  # the original history as it was
    after = _chains(engine, branch)
    assert after[0] == before[0]  # the shared batch 1, same chain hash
    assert [row[2] for row in after[1:]] != [row[2] for row in before[1:]]  # the later ones recomputed
    branch_facts = run_facts_frame(engine, branch)
    later = [int(f) for f in facts[facts["seq"] >= 2]["fact_id"] if int(f) != wrong]
    assert [int(f) for f in branch_facts[branch_facts["seq"] >= 2]["fact_id"]] == later
    assert all(torch.equal(a, b) for a, b in zip(weights_at(engine, parent, 1).values(),
                                                  weights_at(engine, branch, 1).values()))
    assert verify_run(engine, branch).ok and verify_run(engine, parent).ok
    lineage = runs_frame(engine).set_index("run_id").loc[branch]
    assert (lineage["parent_run_id"], lineage["parent_seq"], lineage["retracted_fact_id"],
            lineage["branch_reason"]) == (parent, 1, wrong, "wrong source")
    subject = facts[facts["fact_id"] == wrong]["subject"].iloc[0]
    timeline = subject_timeline(engine, subject)
    mine = timeline[timeline["fact_id"] == wrong]
    assert mine["status"].tolist() == [f"retracted (branch run {branch})"] and mine["run_id"].tolist() == [parent]
    assert main(["retract", "--run", str(branch), "--fact", str(wrong), "--db", url]) == 2
    assert "not in run" in capsys.readouterr().err


def _record(index: int, subject: str, target: str, relation: str = "P1") -> SourceRecord:
    data = {"subject": subject, "prompt": "{} works for", "target_new": target, "target_true": "Nobody",
            "relation_id": relation}
    return SourceRecord(index, f"record {index}", json.dumps(data).encode(), data)


def test_a_correction_supersedes_the_applied_fact_and_the_timeline_shows_both(database):
    from db.ledger import acquire_writer
    from fixtures.database import apply_and_commit, new_run, random_weights

    engine = database.engine
    first = ingest_records(engine, [_record(0, "Acme Corp", "Alice"), _record(1, "Acme Corp", "Paris", "P2")],
                           "monday")
    assert first.superseded == []
    weights = random_weights()
    run = new_run(engine, weights, batch_size=2)
    with acquire_writer(engine, run.id) as writer:
        apply_and_commit(writer, writer.claim_batch(), weights, torch.Generator().manual_seed(0))
    second = ingest_records(engine, [_record(0, "Acme Corp", "Bob"), _record(1, "Acme Corp", "Paris", "P2")],
                            "tuesday")
    with transaction(engine) as session:
        ids = dict(session.execute(select(FactRecord.target_new, FactRecord.id)
                                   .where(FactRecord.relation_id == "P1")).tuples().all())
        superseded = session.scalar(select(FactRecord.superseded_by).where(FactRecord.id == ids["Alice"]))
    assert second.superseded == [(ids["Alice"], ids["Bob"])] and superseded == ids["Bob"]
    assert ingest_records(engine, [_record(0, "Acme Corp", "Bob")], "tuesday").superseded == []  # idempotent
    timeline = subject_timeline(engine, "acme").set_index("target_new")
    assert timeline.loc["Alice", "status"] == f"superseded by fact {ids['Bob']}"
    assert timeline.loc["Bob", "status"] == "pending" and timeline.loc["Paris", "status"].tolist() == ["applied",
                                                                                                       "duplicate"]
