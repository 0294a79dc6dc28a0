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

LEGEND = {
    "seq": "the batch after which the model was evaluated (0: before any edit)",
    "n_edits": "facts in the model at that point",
    "es": "efficacy: share of the batch's facts whose new target beats the old one on the edit prompt",
    "ps": "paraphrase success: the same on paraphrased prompts",
    "ns": "neighbourhood success: share of unrelated prompts about neighbours that still prefer the true object",
    "s": "score: harmonic mean of ES, PS and NS",
    "retention.es": "efficacy of the earlier batches' facts (a sample), measured again at this point",
    "retention.ps": "paraphrase success of the earlier facts, measured again",
    "ge": "generation entropy of free text (fluency; falls when the model repeats itself)",
    "ppl.*": "perplexity on a corpus (mean.ppl: their mean; ppl.probe: the health check's short probe)",
    "acc.*": "downstream task accuracy (mean.acc: their mean); chance.* is the task's chance level",
    "norm.w.*": "Frobenius norm of the edited layer's weight",
    "norm.dw.*": "‖W − W0‖_F of the edited layer: how far the edits have moved it",
    "wild.*": "exact match of greedily generated answers (no teacher forcing)",
}
"""What each metric column means: printed under every summary table (markdown, Prefect artifact, HTML page)."""


def legend_keys(columns) -> list[str]:
    """The :data:`LEGEND` entries for the columns shown, in their order (a family once, for any of its members
    or its ``mean.<family>``)."""
    keys: list[str] = []
    for column in map(str, columns):
        if column.startswith("mean.") and column[5:] in FAMILIES:
            column = FAMILIES[column[5:]]
        key = column if column in LEGEND else next(
            (family for family in LEGEND if family.endswith("*") and column.startswith(family[:-1])), None)
        if key and key not in keys:
            keys.append(key)
    return keys


def legend_markdown(columns) -> str:
    """:func:`legend_keys` as a markdown list."""
    return "\n".join(f"- `{key}`: {LEGEND[key]}" for key in legend_keys(columns))


def metrics_wide(engine: Engine, run_id: int, kind: str | None = None) -> pd.DataFrame:
    """One row per active evaluation (``seq``, ``evaluation_id``, ``kind``), one column per metric, plus
    family means; ``kind`` keeps only full evaluations or only the health checks after batches."""
    long = metrics_frame(engine, run_id, kind=kind)
    if long.empty:
        return pd.DataFrame(columns=["seq", "evaluation_id", "kind"])
    wide = long.pivot(index=["seq", "evaluation_id", "kind"], columns="name", values="value").reset_index()
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
    wide = metrics_wide(engine, run_id, kind="full")
    if not wide.empty:
        table = summary_table(wide)
        lines += ["## Metrics per evaluation", "", _markdown(table), "", legend_markdown(table.columns), ""]
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


def _label_axis(axis, title: str) -> None:
    """Title, x label and grid of a panel; perplexity on a log scale, because a collapse takes it from ~40
    to millions and on a linear axis everything before the collapse would be one flat line."""
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("facts edited")
    axis.grid(alpha=0.3)
    if title.startswith("Perplexity"):
        axis.set_yscale("log")


def plot_metrics(engine: Engine, run_id: int, path: Path) -> Path:
    """A PNG of :func:`metrics_figure`."""
    return _save(metrics_figure(engine, run_id), path)


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def metrics_figure(engine: Engine, run_id: int):
    """The metric curves over the number of edits: edit success, retention, GE, perplexity, downstream
    accuracy and the edited layers' norm growth, one panel each (a matplotlib figure)."""
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
            points = wide[["n_edits", column]].dropna()  # health checks carry only some metrics
            axis.plot(points["n_edits"], points[column], marker="o", markersize=3, label=str(column))
        _label_axis(axis, title)
        axis.legend(fontsize=7, ncol=2)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(f"Run {run_id}: {run.spec.algorithm} on {Path(run.spec.model_name).name}, "
                    f"batch {run.spec.batch_size}")
    figure.tight_layout()
    return figure


COMPARISON_PANELS = (
    ("Efficacy (ES) of the batch just edited", lambda wide: ["es"]),
    ("Paraphrase (PS) of the batch just edited", lambda wide: ["ps"]),
    ("Neighbourhood (NS) of the batch just edited", lambda wide: ["ns"]),
    ("Retention ES of earlier edits", lambda wide: ["retention.es"]),
    ("Perplexity, WikiText-2", lambda wide: ["ppl.wikitext-2-test"]),
    ("Perplexity probe (every batch)", lambda wide: ["ppl.probe"]),
    ("Mean downstream accuracy", lambda wide: ["mean.acc"]),
    ("‖W − W0‖_F, last edited layer", lambda wide: [_last_layer_column(wide, "norm.dw.")]),
)
"""What the comparison plot shows, one panel each: a title and the column to draw for every run."""


def _last_layer_column(wide: pd.DataFrame, prefix: str) -> str:
    layers = [int(str(c)[len(prefix):]) for c in wide.columns if str(c).startswith(prefix)]
    return f"{prefix}{max(layers)}" if layers else f"{prefix}?"


def first_alarms(engine: Engine, run_ids: list[int]) -> pd.DataFrame:
    """Per run: its algorithm, how many facts it applied, and where its first alarm fired (if one did):
    the batch, and the facts the model held then (a later rollback does not change that)."""
    rows = []
    for run_id in run_ids:
        run = get_run(engine, run_id)
        batches = batches_frame(engine, run_id)
        alarms = alarms_frame(engine, run_id)
        row = {"run": run_id, "algorithm": run.spec.algorithm, "batch_size": run.spec.batch_size,
               "edits": int(batches.loc[batches["status"] == "applied", "n_facts"].sum()),
               "first_alarm_edits": None, "first_alarm_seq": None, "rule": None, "metric": None, "value": None,
               "baseline": None}
        if not alarms.empty:
            first = alarms.iloc[0]
            row.update(first_alarm_seq=int(first["seq"]), rule=first["rule"], metric=first["metric"],
                       value=first["value"], baseline=first["baseline"],
                       first_alarm_edits=_edits_held(batches, first["batch_id"]))
        rows.append(row)
    return pd.DataFrame(rows).astype({"first_alarm_edits": "Int64", "first_alarm_seq": "Int64"})


def _edits_held(batches: pd.DataFrame, batch_id: object) -> int:
    """Facts in the model right after batch ``batch_id`` was applied: per sequence number up to its own,
    the latest batch claimed no later than it (earlier ones were rolled back and replaced)."""
    if pd.isna(batch_id):
        return 0
    row = batches[batches["batch_id"] == batch_id].iloc[0]
    history = batches[(batches["batch_id"] <= batch_id) & (batches["seq"] <= row["seq"])
                      & (batches["status"] != "failed")]
    return int(history.sort_values("batch_id").groupby("seq").tail(1)["n_facts"].sum())


def plot_comparison(engine: Engine, run_ids: list[int], path: Path) -> Path:
    """A PNG of :func:`comparison_figure`."""
    return _save(comparison_figure(engine, run_ids), path)


def comparison_figure(engine: Engine, run_ids: list[int]):
    """The runs' curves on shared axes against the number of edits, one panel per :data:`COMPARISON_PANELS`
    entry that some run has; a dotted vertical line marks each run's first alarm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = {run_id: metrics_wide(engine, run_id) for run_id in run_ids}
    labels = {run_id: f"run {run_id}: {get_run(engine, run_id).spec.algorithm}" for run_id in run_ids}
    panels = [(title, pick) for title, pick in COMPARISON_PANELS
              if any(column in wide.columns for wide in frames.values() for column in pick(wide))]
    if not panels:
        raise ValueError(f"runs {run_ids} have no evaluations to compare")
    alarms = first_alarms(engine, run_ids).set_index("run")["first_alarm_edits"]
    rows = math.ceil(len(panels) / 2)
    figure, axes = plt.subplots(rows, 2, figsize=(12, 3.2 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (title, pick) in zip(axes.flat, panels):
        for index, (run_id, wide) in enumerate(frames.items()):
            colour = colours[index % len(colours)]
            for column in pick(wide):
                if column in wide.columns:
                    points = wide[["n_edits", column]].dropna()
                    axis.plot(points["n_edits"], points[column], marker="o", markersize=2, color=colour,
                              label=labels[run_id])
            if pd.notna(alarms.get(run_id)):
                axis.axvline(float(alarms[run_id]), color=colour, linestyle=":", linewidth=1)
        _label_axis(axis, title)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(f"Runs {', '.join(map(str, run_ids))} compared (dotted: first collapse alarm)")
    figure.tight_layout()
    return figure


def comparison_markdown(engine: Engine, run_ids: list[int]) -> str:
    """The first-alarm table of the runs, then every full evaluation of each run in edit order, with
    ``‖W − W0‖`` of its last edited layer: a study reads its milestones (ES, retention, perplexity,
    downstream accuracy, norm growth at 500, 1,000, … edits) off this one table."""
    alarms = first_alarms(engine, run_ids)
    lines = [f"# Runs {', '.join(map(str, run_ids))} compared", "", "## First collapse alarm", "",
             _markdown(alarms.astype(object).where(alarms.notna(), "—")), ""]
    wides = {run_id: metrics_wide(engine, run_id, kind="full") for run_id in run_ids}
    points = [_evaluation_points(run_id, wide) for run_id, wide in wides.items() if not wide.empty]
    if points:
        lines += ["## Full evaluations", "", _markdown(pd.concat(points, ignore_index=True)), ""]
    return "\n".join(lines)


def _evaluation_points(run_id: int, wide: pd.DataFrame) -> pd.DataFrame:
    """A run's full evaluations as :func:`summary_table` rows, with each perplexity in its own column instead of
    their mean (WikiText, ME-PPL and the probe differ in scale, so a study reads them one by one), plus the
    last edited layer's ``‖W − W0‖``."""
    table = summary_table(wide).drop(columns="mean.ppl", errors="ignore")
    perplexities = sorted(str(c) for c in wide.columns if str(c).startswith(FAMILIES["ppl"]))
    for column in [*perplexities, _last_layer_column(wide, FAMILIES["norm_dw"])]:
        if column in wide.columns:
            table[column] = wide[column].to_numpy()
    table.insert(0, "run", run_id)
    return table
