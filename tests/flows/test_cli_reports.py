"""``seqedit history / export / report / serve`` on a real ledger (no model needed to read one)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from db.evaluations import record_alarm, record_evaluation
from db.ledger import acquire_writer
from flows.cli import main
from fixtures.database import add_facts, apply_and_commit, new_run, random_weights


@pytest.fixture
def recorded_run(database):
    """4 batches of 2 synthetic facts, evaluated at 0, 2 and 4, with one alarm, then rolled back to 3."""
    engine = database.engine
    add_facts(engine, 8)
    weights = random_weights()
    run = new_run(engine, weights, batch_size=2, name="cli")
    generator = torch.Generator().manual_seed(0)
    with acquire_writer(engine, run.id) as writer:
        for _ in range(4):
            apply_and_commit(writer, writer.claim_batch(), weights, generator, timings={"keys_values": 1.5})
    for seq in (0, 2, 4):
        evaluation = record_evaluation(engine, run.id, seq, [("es", 0.1 * seq), ("ppl.wiki", 10.0 + seq),
                                                             ("acc.sst2", 0.8 - 0.05 * seq),
                                                             ("norm.dw.1", float(seq))], duration_s=2.0)
    record_alarm(engine, run.id, 4, rule="ppl.*:ratio:1.2", metric="ppl.wiki", value=14.0, baseline=10.0,
                 threshold=1.2, action="warn", message="ppl.wiki = 14", evaluation_id=evaluation)
    with acquire_writer(engine, run.id) as writer:
        writer.rollback(3)
    return database, run.id


def test_history_lists_runs_batches_metrics_and_subject_edits(recorded_run, capsys):
    database, run_id = recorded_run
    assert main(["history", "--db", database.url, "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [(row["run_id"], row["name"]) for row in runs] == [(run_id, "cli")]

    assert main(["history", "--db", database.url, "--run", str(run_id), "--json"]) == 0
    batches = json.loads(capsys.readouterr().out)
    assert [(row["seq"], row["status"]) for row in batches] == [(1, "applied"), (2, "applied"), (3, "applied"),
                                                               (4, "rolled_back")]
    assert batches[0]["seconds_keys_values"] == 1.5

    assert main(["history", "--db", database.url, "--run", str(run_id), "--metrics", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert [(row["seq"], row["n_edits"], row["es"]) for row in metrics] == [(0, 0, 0.0), (2, 4, pytest.approx(0.2))]

    assert main(["history", "--db", database.url, "--subject", "Subject 7"]) == 0
    assert "rolled_back" in capsys.readouterr().out  # fact 8 was in batch 4

    assert main(["history", "--db", database.url, "--run", "99"]) == 2
    assert "no run 99" in capsys.readouterr().err


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_export_writes_every_table(recorded_run, tmp_path, capsys, file_format):
    database, run_id = recorded_run
    out = tmp_path / "export"
    assert main(["export", "--db", database.url, "--run", str(run_id), "--out", str(out),
                 "--format", file_format]) == 0
    read = pd.read_csv if file_format == "csv" else pd.read_parquet
    metrics = read(out / f"metrics.{file_format}")
    assert len(metrics) == 12 and set(metrics["status"]) == {"active", "rolled_back"}
    assert len(read(out / f"batches.{file_format}")) == 4
    facts = read(out / f"facts.{file_format}")
    assert list(facts["fact_id"]) == list(range(1, 9)) and list(facts["seq"]) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert read(out / f"alarms.{file_format}")["metric"].tolist() == ["ppl.wiki"]


def test_report_writes_a_plot_and_a_markdown_summary(recorded_run, tmp_path, capsys):
    database, run_id = recorded_run
    assert main(["report", "--db", database.url, "--run", str(run_id), "--out", str(tmp_path)]) == 0
    plot = tmp_path / f"run-{run_id}-metrics.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    summary = (tmp_path / f"run-{run_id}-summary.md").read_text()
    assert "| seq | n_edits | es |" in summary and "Collapse alarms" in summary
    assert "Rolled back: batches [4]" in summary and "keys_values" in summary


def test_serve_builds_a_cron_deployment_that_resumes_the_run(tmp_path):
    from flows.commands.serve import bulk_update_deployment

    deployment = bulk_update_deployment(7, f"sqlite:///{tmp_path / 'l.db'}", "0 2 * * *", "Europe/Paris")
    assert deployment.name == "seqedit-run-7"
    assert deployment.parameters == {"run_id": 7, "db_url": f"sqlite:///{tmp_path / 'l.db'}"}
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Paris")
