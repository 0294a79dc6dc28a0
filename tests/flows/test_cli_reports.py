"""``seqedit history / export / report / serve`` on a real ledger (no model needed to read one)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile

import pandas as pd
import pytest
import torch
from sqlalchemy import text as sql_text

from db.evaluations import AlarmRow, record_evaluation
from db.ledger import acquire_writer
from flows.cli import main
from flows.reporting import comparison_figure, first_alarms, metrics_figure
from fixtures.database import add_facts, apply_and_commit, new_run, random_weights


def _panels(figure) -> dict[str, dict[str, tuple[list, list]]]:
    """Each visible panel's title → its labelled series → (x, y), rounded: what a reader of the plot sees."""
    return {axis.get_title(): {line.get_label(): ([round(float(x), 6) for x in line.get_xdata()],
                                                  [round(float(y), 6) for y in line.get_ydata()])
                               for line in axis.lines if not line.get_label().startswith("_")}
            for axis in figure.axes if axis.get_visible()}


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
            apply_and_commit(writer, writer.claim_batch(), weights, generator, timings={"keys": 1.5})
    alarm = AlarmRow(rule="ppl.*:ratio:1.2", metric="ppl.wiki", value=14.0, baseline=10.0, threshold=1.2,
                     action="warn", message="ppl.wiki = 14")
    for seq in (0, 2, 4):
        record_evaluation(engine, run.id, seq, [("es", 0.1 * seq), ("ppl.wiki", 10.0 + seq),
                                                ("acc.sst2", 0.8 - 0.05 * seq), ("norm.dw.1", float(seq))],
                          duration_s=2.0, alarms=[alarm] if seq == 4 else [])
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
    assert batches[0]["seconds_keys"] == 1.5

    assert main(["history", "--db", database.url, "--run", str(run_id), "--metrics", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert [(row["seq"], row["n_edits"], row["es"]) for row in metrics] == [(0, 0, 0.0), (2, 4, pytest.approx(0.2))]

    assert main(["history", "--db", database.url, "--subject", "Subject 7", "--json"]) == 0
    (edit,) = json.loads(capsys.readouterr().out)  # fact 8 was in batch 4, rolled back after its evaluation
    assert (edit["fact_id"], edit["seq"], edit["status"], edit["eval_seq"]) == (8, 4, "rolled back", 4)
    assert edit["eval_es"] == pytest.approx(0.4)
    assert main(["history", "--db", database.url, "--subject", "Subject 5", "--json"]) == 0
    (edit,) = json.loads(capsys.readouterr().out)  # fact 6, batch 3: the next standing evaluation is none
    assert (edit["fact_id"], edit["seq"], edit["status"], edit["eval_seq"]) == (6, 3, "applied", None)

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
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = _panels(metrics_figure(database.engine, run_id))  # what the PNG shows, read from its figure
    assert list(panels) == ["Edit success (batch just edited)", "Perplexity", "Downstream accuracy",
                            "‖W − W0‖_F per layer"]
    # the active evaluations at batches 0 and 2 (4 edits); batch 4's was rolled back and is not drawn
    assert panels["Edit success (batch just edited)"] == {"es": ([0, 4], [0.0, 0.2])}
    assert panels["Perplexity"] == {"ppl.wiki": ([0, 4], [10.0, 12.0])}
    assert panels["Downstream accuracy"] == {"acc.sst2": ([0, 4], [0.8, 0.7])}
    assert panels["‖W − W0‖_F per layer"] == {"norm.dw.1": ([0, 4], [0.0, 2.0])}
    summary = (tmp_path / f"run-{run_id}-summary.md").read_text()
    assert "| seq | n_edits | es |" in summary and "Collapse alarms" in summary
    assert "Rolled back: batches [4]" in summary and "keys" in summary


def test_serve_builds_a_cron_deployment_that_resumes_the_run(tmp_path):
    from flows.commands.serve import bulk_update_deployment

    deployment = bulk_update_deployment(7, f"sqlite:///{tmp_path / 'l.db'}", "0 2 * * *", "Europe/Paris")
    assert deployment.name == "seqedit-run-7"
    assert deployment.parameters == {"run_id": 7, "db_url": f"sqlite:///{tmp_path / 'l.db'}"}
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Paris")


def test_report_compares_runs_on_shared_axes_with_their_first_alarms(recorded_run, tmp_path, capsys):
    database, first = recorded_run
    engine = database.engine
    add_facts(engine, 6, start=100)
    weights = random_weights(seed=3)
    second = new_run(engine, weights, batch_size=3, name="other")
    generator = torch.Generator().manual_seed(1)
    with acquire_writer(engine, second.id) as writer:
        for _ in range(2):
            apply_and_commit(writer, writer.claim_batch(), weights, generator)
    alarm = AlarmRow(rule="ppl.*:ratio:1.2", metric="ppl.probe", value=15.0, baseline=10.0, threshold=1.2,
                     action="warn", message="ppl.probe = 15")
    for seq in (0, 1, 2):
        record_evaluation(engine, second.id, seq, [("es", 0.9), ("ppl.probe", 10.0 + 5 * seq)], kind="health",
                          alarms=[alarm] if seq == 1 else [])
    out = tmp_path / "compare"
    assert main(["report", "--db", database.url, "--run", str(first), "--run", str(second.id),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    plot, summary = out / f"compare-runs-{first}-{second.id}.png", out / f"compare-runs-{first}-{second.id}.md"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and summary.read_text() in printed
    figure = comparison_figure(engine, [first, second.id])
    panels = _panels(figure)
    assert panels["Efficacy (ES) of the batch just edited"] == {
        f"run {first}: memit": ([0, 4], [0.0, 0.2]), f"run {second.id}: memit": ([0, 3, 6], [0.9, 0.9, 0.9])}
    assert panels["Perplexity probe (every batch)"] == {f"run {second.id}: memit": ([0, 3, 6], [10.0, 15.0, 20.0])}
    alarm_lines = [line.get_xdata()[0] for axis in figure.axes if axis.get_visible() for line in axis.lines
                   if line.get_linestyle() == ":"]
    assert set(alarm_lines) == {3.0, 8.0}  # in every panel, each run's first alarm: after 3 edits, and at batch 4 (8 edits,
    #                                           rolled back since, but raised: the history keeps it)
    assert "## First collapse alarm" in printed and "ppl.*:ratio:1.2" in printed
    # every active full evaluation (batch 4's was rolled back; the second run has health checks only)
    points = printed[printed.index("## Full evaluations"):].splitlines()
    header = [column.strip() for column in points[2].strip("|").split("|")]
    assert "norm.dw.1" in header and "ppl.wiki" in header and "mean.ppl" not in header
    assert [row.split("|")[1:3] for row in points[4:] if row.startswith("|")] == [
        [f" {first} ", " 0 "], [f" {first} ", " 2 "]]
    alarms = first_alarms(engine, [first, second.id]).set_index("run")
    # the first run's alarm fired at batch 4 (8 facts in the model), later rolled back; the second's at batch 1
    assert (alarms.loc[first, "first_alarm_seq"], alarms.loc[first, "first_alarm_edits"]) == (4, 8)
    assert (alarms.loc[second.id, "first_alarm_seq"], alarms.loc[second.id, "first_alarm_edits"]) == (1, 3)
    assert alarms.loc[second.id, "metric"] == "ppl.probe" and alarms.loc[first, "edits"] == 6


def test_the_cli_offers_every_algorithm():
    from editing.objectives import ALGORITHMS as KNOWN
    from flows.commands.common import ALGORITHMS

    assert sorted(ALGORITHMS) == sorted(KNOWN)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*arguments: str) -> subprocess.CompletedProcess:
    """Headless Chromium as a user's browser would load the page (root needs --no-sandbox)."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                               *arguments], capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_audit_page_renders_verification_lineage_plots_and_timeline_in_chromium(recorded_run, tmp_path, capsys):
    from db.branch import create_branch
    from PIL import Image

    database, run_id = recorded_run
    branch = create_branch(database.engine, run_id, 2, "the capital was wrong")
    assert main(["report", "--db", database.url, "--run", str(run_id), "--html", "--out", str(tmp_path)]) == 0
    page = tmp_path / f"run-{run_id}-audit.html"
    assert f"audit page: {page}" in capsys.readouterr().out

    dom = _chromium("--dump-dom", page.as_uri()).stdout  # the document as Chromium parsed and rendered it
    verification = dom[dom.index('id="verification"'):]
    assert verification.split("</div>")[0].count("Verified") == 1 and "4 batches, 3 evaluations" in verification
    assert f"run {branch.id} branches from it after batch 0, without fact 2: the capital was wrong" in dom
    assert "<dt>es</dt>" in dom and "<dt>norm.dw.*</dt>" in dom  # the legend of the metric table's columns
    timeline = dom[dom.index('id="timeline"'):].split("</table>")[0]
    assert timeline.count('<tr class="applied">') == 3 and timeline.count('<tr class="rolled_back">') == 1
    assert "#1 Subject 0" in timeline and "ppl.wiki" in dom  # the alarm

    screenshot = tmp_path / "page.png"
    _chromium(f"--screenshot={screenshot}", "--window-size=1280,2400", page.as_uri())
    pixels = Image.open(screenshot).convert("HSV").getdata()
    coloured = sum(1 for _, saturation, value in pixels if saturation > 150 and value > 80)
    assert coloured > 2000, "the inlined metric plot (its coloured curves) did not render"

    # a tampered ledger: the page says so, naming the evaluation and the metric
    with database.engine.begin() as connection:
        connection.execute(sql_text("UPDATE metrics SET value = 0.99 WHERE name = 'es'"))
    assert main(["report", "--db", database.url, "--run", str(run_id), "--html", "--out", str(tmp_path)]) == 0
    dom = _chromium("--dump-dom", page.as_uri()).stdout
    assert "NOT verified" in dom and "es" in dom[dom.index("NOT verified"):].split("</div>")[0]
