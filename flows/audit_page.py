"""``seqedit report --run N --html``: one static HTML page an auditor can open anywhere, no server.

It holds what an audit of a run asks, read from the ledger only: the verification result (:func:`db.audit.
verify_run`: chain, seals, replay, checkpoints) first, because everything below is only as good as it; the
run's configuration; its lineage (the run it branches from, the branches made from it); the metric plots
(inlined as a PNG, so the page is one file); the headline metrics with a legend; the alarms; the rollbacks;
and the timeline of batches with each one's facts and chain hash. Every value is HTML-escaped: fact texts come
from users' files.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime, timezone

import pandas as pd
from sqlalchemy import Engine, select

from db.audit import Verification, verify_run
from db.branch import lineage
from db.engine import transaction
from db.history import alarms_frame, batches_frame, run_facts_frame
from db.models import BatchRecord, RunRecord
from db.runs import RunInfo, get_run
from flows.reporting import LEGEND, legend_keys, metrics_figure, metrics_wide, summary_table, timing_summary

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ddd; padding: 2px 6px; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { background: #e6f4e6; border: 1px solid #7a7; padding: 0.6em; }
.bad { background: #fbe9e9; border: 1px solid #c77; padding: 0.6em; }
code, pre { font-size: 0.85em; } pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
img { max-width: 100%; } dt { font-weight: bold; font-family: monospace; } dd { margin: 0 0 0.3em 1.5em; }
tr.rolled_back td, tr.failed td { color: #999; }
"""


def audit_page(engine: Engine, run_id: int) -> str:
    """The page for run ``run_id`` as one HTML string."""
    run = get_run(engine, run_id)
    verification = verify_run(engine, run_id)
    title = f"Run {run_id}{f' — {run.spec.name}' if run.spec.name else ''}"
    sections = [f"<h1>{_text(title)}</h1>",
                f"<p>Audit page written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} from the ledger "
                f"<code>{_text(engine.url.render_as_string(hide_password=True))}</code>.</p>",
                _verification(verification), _configuration(run), _lineage(engine, run),
                *_metrics(engine, run_id), _alarms(engine, run_id), _rollbacks(engine, run_id),
                _timeline(engine, run_id), _time(engine, run_id)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_text(title)} · seqedit audit</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(section for section in sections if section) + "\n</body></html>\n")


def _text(value: object) -> str:
    return html.escape("" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value))


def _table(frame: pd.DataFrame, row_class: str | None = None, digits: int = 4) -> str:
    """An escaped HTML table; numbers right-aligned; ``row_class`` names a column whose value classes the row."""
    head = "".join(f"<th>{_text(column)}</th>" for column in frame.columns)
    rows = []
    for record in frame.to_dict(orient="records"):
        cells = []
        for value in record.values():
            if isinstance(value, float):
                cells.append(f"<td class=\"num\">{'' if pd.isna(value) else f'{value:.{digits}g}'}</td>")
            elif isinstance(value, int):
                cells.append(f"<td class=\"num\">{value}</td>")
            else:
                cells.append(f"<td>{_text(value)}</td>")
        css = f" class=\"{_text(record[row_class])}\"" if row_class else ""
        rows.append(f"<tr{css}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _verification(result: Verification) -> str:
    checked = (f"{result.batches} batches, {result.evaluations} evaluations, {result.replayed} batches replayed "
               f"from the original weights, {result.checkpoints} checkpoints")
    if result.ok:
        body = (f"<div class=\"ok\" id=\"verification\"><strong>Verified</strong>: {checked}. Chain head "
                f"<code>{_text(result.head)}</code> — record it outside the ledger; "
                f"<code>seqedit verify --run {result.run_id} --expect HEAD</code> proves it later.</div>")
    else:
        problems = "".join(f"<li>{_text(problem)}</li>" for problem in result.problems)
        body = (f"<div class=\"bad\" id=\"verification\"><strong>NOT verified</strong> "
                f"({len(result.problems)} problems; checked {checked}):<ul>{problems}</ul></div>")
    return "<h2>Verification</h2>\n" + body


def _configuration(run: RunInfo) -> str:
    spec = run.spec
    rows = [("status", run.status), ("model", spec.model_name), ("revision", spec.model_revision),
            ("fingerprint", spec.model_fingerprint), ("objective", spec.algorithm),
            ("edit distribution", spec.distribution), ("layers", list(run.layers)), ("batch size", spec.batch_size),
            ("evaluation every", f"{spec.eval_every} batches"),
            ("checkpoint every", f"{spec.checkpoint_every} batches"),
            ("fact pool", f"{spec.fact_pool}{f' (source {spec.fact_source})' if spec.fact_source else ''}"),
            ("collapse policy", json.dumps(dict(spec.collapse_policy), sort_keys=True)),
            ("created", f"{run.created_at:%Y-%m-%d %H:%M:%S}"), ("last change", f"{run.updated_at:%Y-%m-%d %H:%M:%S}")]
    table = "".join(f"<tr><th>{_text(name)}</th><td>{_text(value)}</td></tr>" for name, value in rows)
    original = "".join(f"<tr><th>layer {layer}</th><td><code>{_text(sha)}</code></td></tr>"
                       for layer, sha in sorted(run.original_sha256.items()))
    hparams = _text(json.dumps(dict(spec.hyperparameters), indent=2, sort_keys=True))
    return (f"<h2>Configuration</h2>\n<table id=\"configuration\">{table}</table>\n<h3>Original layers (sha256)</h3>"
            f"<table>{original}</table>\n<details><summary>Hyperparameters</summary><pre>{hparams}</pre></details>")


def _lineage(engine: Engine, run: RunInfo) -> str:
    ancestors = lineage(engine, run.id)[1:]
    lines = [f"<li>branches from run {parent.id} after its batch {child.spec.parent_seq}, "
             f"{_without(child.spec.retracted_fact_id, child.spec.branch_reason)}</li>"
             for child, parent in zip([run, *ancestors], ancestors)]
    with transaction(engine) as session:
        branches = session.execute(select(RunRecord.id, RunRecord.parent_seq, RunRecord.retracted_fact_id,
                                          RunRecord.branch_reason).where(RunRecord.parent_run_id == run.id)
                                   .order_by(RunRecord.id)).all()
    lines += [f"<li>run {branch.id} branches from it after batch {branch.parent_seq}, "
              f"{_without(branch.retracted_fact_id, branch.branch_reason)}</li>" for branch in branches]
    body = (f"<ul id=\"lineage\">{''.join(lines)}</ul>" if lines
            else "<p id=\"lineage\">No branches: an original run.</p>")
    return "<h2>Lineage</h2>\n" + body


def _without(fact_id: int | None, reason: str | None) -> str:
    return f"without fact {fact_id}" + (f": {_text(reason)}" if reason else "")


def _metrics(engine: Engine, run_id: int) -> list[str]:
    wide = metrics_wide(engine, run_id, kind="full")
    if wide.empty:
        return ["<h2>Metrics</h2>\n<p>No full evaluations (a run with <code>--eval-every 0</code>).</p>"]
    figure = metrics_figure(engine, run_id)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    import matplotlib.pyplot as plt

    plt.close(figure)
    image = base64.b64encode(buffer.getvalue()).decode()
    table = summary_table(wide)
    legend = "".join(f"<dt>{_text(key)}</dt><dd>{_text(LEGEND[key])}</dd>" for key in legend_keys(table.columns))
    return [f"<h2>Metric plots</h2>\n<img id=\"metrics-plot\" alt=\"metrics of run {run_id}\" "
            f"src=\"data:image/png;base64,{image}\">",
            f"<h2>Metrics per evaluation</h2>\n{_table(table)}\n<dl id=\"legend\">{legend}</dl>"]


def _alarms(engine: Engine, run_id: int) -> str:
    alarms = alarms_frame(engine, run_id)
    if alarms.empty:
        return "<h2>Collapse alarms</h2>\n<p>None.</p>"
    return "<h2>Collapse alarms</h2>\n" + _table(alarms[["seq", "rule", "metric", "value", "baseline", "action",
                                                         "message"]])


def _rollbacks(engine: Engine, run_id: int) -> str:
    batches = batches_frame(engine, run_id)
    rolled = batches[batches["status"] == "rolled_back"]
    if rolled.empty:
        return "<h2>Rollbacks</h2>\n<p>None.</p>"
    groups = (rolled.groupby(["rolled_back_at", "rolled_back_to"])["seq"].apply(lambda seqs: sorted(map(int, seqs)))
              .reset_index())
    lines = "".join(f"<li>{row.rolled_back_at:%Y-%m-%d %H:%M:%S}: back to batch {int(row.rolled_back_to)}, undoing "
                    f"batches {row.seq}</li>" for row in groups.itertuples())
    return f"<h2>Rollbacks</h2>\n<ul id=\"rollbacks\">{lines}</ul>"


def _timeline(engine: Engine, run_id: int) -> str:
    batches = batches_frame(engine, run_id)
    facts = run_facts_frame(engine, run_id)
    with transaction(engine) as session:
        chain = dict(session.execute(select(BatchRecord.id, BatchRecord.chain_sha256)
                                     .where(BatchRecord.run_id == run_id)).all())
    listed = facts.groupby("batch_id").apply(
        lambda group: "; ".join(f"#{row.fact_id} {row.subject}: {row.target_true} → {row.target_new}"
                                for row in group.itertuples()), include_groups=False)
    frame = pd.DataFrame({"seq": batches["seq"].astype(int), "status": batches["status"].astype(str),
                          "finished": batches["finished_at"].map(_when),
                          "facts": batches["n_facts"].astype(int),
                          "chain hash": batches["batch_id"].map(lambda i: (chain.get(i) or "")[:16]),
                          "edited": batches["batch_id"].map(lambda i: listed.get(i, ""))})
    return f"<h2>Timeline</h2>\n<div id=\"timeline\">{_table(frame, row_class='status')}</div>"


def _when(moment) -> str:
    return "" if pd.isna(moment) else f"{moment:%Y-%m-%d %H:%M:%S}"


def _time(engine: Engine, run_id: int) -> str:
    timings = timing_summary(engine, run_id)
    return "" if timings.empty else "<h2>Time</h2>\n" + _table(timings)
