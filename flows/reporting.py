"""What a run's ledger says, for people: a wide metric table, a markdown summary and a PNG plot.

Everything here reads the ledger only (never the model), so a report can be made
for any run, finished or not, from any machine that reaches the database. The
same table and summary are published as Prefect artifacts at the end of a run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from sqlalchemy import Engine

from db.history import TIMING_PREFIX, alarms_frame, batches_frame, evaluations_frame, metrics_frame
from db.runs import get_run

HEADLINE = ("es", "ps", "ns", "s", "retention.es", "retention.ps", "ge")
"""Metrics shown one by one; families (``ppl.*``, ``acc.*``, ``norm.*``) are shown as their mean too."""
FAMILIES = {"ppl": "ppl.", "acc": "acc.", "norm_w": "norm.w.", "norm_dw": "norm.dw."}


def metrics_wide(engine: Engine, run_id: int) -> pd.DataFrame:
    """One row per active evaluation (``seq``, ``evaluation_id``), one column per metric, plus family means."""
    long = metrics_frame(engine, run_id)
    if long.empty:
        return pd.DataFrame(columns=["seq", "evaluation_id"])
    wide = long.pivot(index=["seq", "evaluation_id"], columns="name", values="value").reset_index()
    wide.columns.name = None
    for family, prefix in FAMILIES.items():
        members = [column for column in wide.columns if str(column).startswith(prefix)]
        if members:
            wide[f"mean.{family}"] = wide[members].mean(axis=1)
    batches = batches_frame(engine, run_id)
    applied = batches[batches["status"] == "applied"].sort_values("seq")
    facts = applied.set_index("seq")["n_facts"].cumsum()
    wide.insert(1, "n_edits", wide["seq"].map(lambda seq: int(facts[facts.index <= seq].iloc[-1])
                                             if (facts.index <= seq).any() else 0))
    return wide.sort_values(["seq", "evaluation_id"]).reset_index(drop=True)


def summary_table(wide: pd.DataFrame) -> pd.DataFrame:
    """The headline columns of :func:`metrics_wide` that the run has, in a fixed order."""
    columns = ["seq", "n_edits", *[c for c in HEADLINE if c in wide.columns],
               *[f"mean.{family}" for family in FAMILIES if f"mean.{family}" in wide.columns]]
    return wide[columns]


def timing_summary(engine: Engine, run_id: int) -> pd.DataFrame:
    """Total and mean seconds per phase over the run's applied batches, plus evaluation time."""
    batches = batches_frame(engine, run_id)
    applied = batches[batches["status"] == "applied"]
    phases = [column for column in applied.columns if column.startswith(TIMING_PREFIX)]
    rows = [{"phase": column[len(TIMING_PREFIX):], "total_s": applied[column].sum(), "mean_s": applied[column].mean()}
            for column in phases]
    evaluations = evaluations_frame(engine, run_id)
    if not evaluations.empty:
        rows.append({"phase": "evaluation", "total_s": evaluations["duration_s"].sum(),
                     "mean_s": evaluations["duration_s"].mean()})
    return pd.DataFrame(rows, columns=["phase", "total_s", "mean_s"])


def _markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table (no ``tabulate`` dependency)."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.{digits}f}"
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def markdown_summary(engine: Engine, run_id: int) -> str:
    """The run's settings, its metric curve, its alarms and rollbacks, and where time went."""
    run = get_run(engine, run_id)
    spec = run.spec
    batches = batches_frame(engine, run_id)
    counts = batches["status"].value_counts().to_dict()
    applied = int(batches.loc[batches["status"] == "applied", "n_facts"].sum())
    lines = [f"# Run {run_id}{f' — {spec.name}' if spec.name else ''}", "",
             f"- model: `{spec.model_name}`",
             f"- algorithm: **{spec.algorithm}**, distribution `{spec.distribution}`, layers {list(run.layers)}",
             f"- batch size {spec.batch_size}, evaluation every {spec.eval_every} batches, "
             f"fact pool `{spec.fact_pool}`{f' (source `{spec.fact_source}`)' if spec.fact_source else ''}",
             f"- status **{run.status}**; {applied} facts applied; batches by status: "
             + ", ".join(f"{status} {count}" for status, count in sorted(counts.items())), ""]
    wide = metrics_wide(engine, run_id)
    if not wide.empty:
        lines += ["## Metrics per evaluation", "", _markdown(summary_table(wide)), ""]
    alarms = alarms_frame(engine, run_id)
    if not alarms.empty:
        lines += ["## Collapse alarms", "",
                  _markdown(alarms[["seq", "rule", "metric", "value", "baseline", "action"]]), ""]
    rolled = batches[batches["status"] == "rolled_back"]
    if not rolled.empty:
        lines += [f"Rolled back: batches {sorted(set(rolled['seq'].astype(int)))} "
                  f"(to batch {int(rolled['rolled_back_to'].dropna().min())} at the earliest)", ""]
    timings = timing_summary(engine, run_id)
    if not timings.empty:
        lines += ["## Time", "", _markdown(timings, digits=1), ""]
    return "\n".join(lines)


def plot_metrics(engine: Engine, run_id: int, path: Path) -> Path:
    """A PNG of the metric curves over the number of edits: edit success, retention, GE,
    perplexity, downstream accuracy and the edited layers' norm growth, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = metrics_wide(engine, run_id)
    if wide.empty:
        raise ValueError(f"run {run_id} has no evaluations to plot (was it run with --eval-every 0?)")
    run = get_run(engine, run_id)
    panels = [
        ("Edit success (batch just edited)", [c for c in ("es", "ps", "ns", "s") if c in wide]),
        ("Retention of earlier edits", [c for c in ("retention.es", "retention.ps") if c in wide]),
        ("Generation entropy", [c for c in ("ge",) if c in wide]),
        ("Perplexity", [c for c in wide.columns if str(c).startswith("ppl.")]),
        ("Downstream accuracy", [c for c in wide.columns if str(c).startswith("acc.")]),
        ("‖W − W0‖_F per layer", [c for c in wide.columns if str(c).startswith("norm.dw.")]),
    ]
    panels = [(title, columns) for title, columns in panels if columns]
    figure, axes = plt.subplots(math.ceil(len(panels) / 2), 2, figsize=(11, 3.2 * math.ceil(len(panels) / 2)),
                                squeeze=False)
    for axis, (title, columns) in zip(axes.flat, panels):
        for column in columns:
            axis.plot(wide["n_edits"], wide[column], marker="o", markersize=3, label=str(column))
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("facts edited")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=2)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(f"Run {run_id}: {run.spec.algorithm} on {Path(run.spec.model_name).name}, "
                    f"batch {run.spec.batch_size}")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
