"""What a study's ledger says: each arm's metrics with 95 % bootstrap intervals, paired differences, figures.

* An **independent** arm's metrics are computed from its per-fact scores
  (``arm_fact_scores``): ES/PS/NS/EM/PM/NM/GE are means over facts, S the harmonic
  mean of ES, PS and NS recomputed on every resample (:mod:`editing.evaluation.intervals`).
* A **sequential** arm is a run: its metrics are those of its last full evaluation.
  ES and retention ES are 0/1 per fact, and a downstream accuracy 0/1 per example, so
  their bootstrap needs only the counts the ledger keeps; the other metrics of a run
  are aggregates without per-fact rows and are given without an interval.
* Two independent arms that scored the same facts and differ in exactly one factor
  (objective, or layers/distribution at the same batch size, or batch size between
  neighbouring sizes) are compared by the paired bootstrap on the facts both scored;
  a difference is called one only when its interval excludes 0.

The figures are the paper's: each metric against batch size on a log₂ axis, one line
per objective × distribution, the intervals as bands; sequential arms get the
lifelong comparison of ``seqedit report``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from db.history import metrics_frame
from db.studies import ArmInfo, arm_batches_frame, arm_scores_frame, arm_v_star_frame, find_study, study_arms
from editing.evaluation.intervals import (Interval, binary_sample, bootstrap_interval, harmonic_of_means,
                                          paired_difference)
from flows.studies.independent import batches_of

ACCURACIES = ("rewrite_acc", "rephrase_acc", "locality_acc", "wild_rewrite", "wild_rephrase")
"""Token accuracies under teacher forcing (zsRE's efficacy / generalisation / specificity, EasyEdit's rewrite /
rephrase / locality accuracy) and the WILD answers without it."""
INDEPENDENT_METRICS = ("es", "ps", "ns", "s", "em", "pm", "nm", "ge", *ACCURACIES)
COMPARED = ("es", "ps", "ns", "em", "pm", "nm", "ge", *ACCURACIES)
FIGURE_METRICS = ("es", "ps", "ns", "s", "ge")


def _factors(arm: ArmInfo) -> dict[str, Any]:
    edit = arm.settings.get("edit_overrides", {})
    return {"algorithm": arm.settings.get("algorithm"), "layers": tuple(edit.get("layers", ())),
            "distribution": edit.get("distribution"), "batch_size": arm.settings.get("batch_size"),
            "mode": arm.mode, "n_facts": arm.settings.get("n_facts"), "seed": arm.settings.get("seed", 0),
            "overrides": repr(sorted((k, repr(v)) for k, v in edit.items() if k not in ("layers", "distribution")))}


def independent_metrics(scores: pd.DataFrame, seed: int) -> dict[str, Interval]:
    metrics = {name: bootstrap_interval(scores[name].to_numpy(dtype=float), seed=seed)
               for name in INDEPENDENT_METRICS if name != "s"}
    metrics["s"] = bootstrap_interval(scores[["es", "ps", "ns"]].to_numpy(dtype=float), harmonic_of_means, seed=seed)
    return metrics


def sequential_metrics(engine: Engine, run_id: int, seed: int, n_downstream: int) -> tuple[dict[str, Interval], int]:
    """The run's last full evaluation (and its seq) with intervals where counts allow them."""
    frame = metrics_frame(engine, run_id, kind="full")
    if frame.empty:
        return {}, 0
    last = int(frame["seq"].max())
    values = dict(zip(frame[frame["seq"] == last]["name"], frame[frame["seq"] == last]["value"]))
    metrics: dict[str, Interval] = {}
    counts = {"es": values.get("n_facts"), "retention.es": values.get("retention.n_facts")}
    for name, value in sorted(values.items()):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        total = counts.get(name) or (n_downstream if name.startswith("acc.") else None)
        if total:
            total = int(total)
            metrics[name] = bootstrap_interval(binary_sample(round(value * total), total), seed=seed)
        elif not name.startswith(("seconds", "n_", "retention.n_", "chance.")):
            metrics[name] = Interval(float(value), None, None, 0)
    return metrics, last


def _v_star_quality(engine: Engine, arm: ArmInfo, seed: int) -> dict[str, Any]:
    """The optimisation behind the arm's scores, per fact with intervals: steps (loss evaluations) and the final
    target NLL — what an optimiser (``values.optimizer``) changes."""
    if not arm.v_star_key:
        return {}
    frame = arm_v_star_frame(engine, arm.id, arm.v_star_key)
    if frame.empty:
        return {}
    return {"steps": bootstrap_interval(frame["steps"].to_numpy(float), seed=seed).to_dict(),
            "final_nll": bootstrap_interval(frame["final_nll"].to_numpy(float), seed=seed).to_dict(),
            "stop_reasons": {str(k): int(v) for k, v in frame["stop_reason"].value_counts().items()}}


def mean_memorization(diagnostics: list[dict[str, Any]]) -> dict[str, float]:
    """Per edit layer, the mean over the arm's batches of the share of the residual the update wrote
    (``1 − ‖ΔW K_E − R‖ / ‖R‖``, :func:`editing.objectives.memorization`): below 1 where the objective could not or
    would not write it all — MEMIT's least squares, EMMET's ridge, EMMET with more facts than key dimensions."""
    layers = sorted({layer for d in diagnostics for layer in d.get("memorization", {})}, key=int)
    return {layer: sum(d["memorization"][layer] for d in diagnostics) / len(diagnostics) for layer in layers}


def arm_summary(engine: Engine, arm: ArmInfo) -> dict[str, Any]:
    """One arm as ``seqedit study status|report --json`` gives it."""
    seed = int(arm.settings.get("seed", 0))
    n_facts = int(arm.settings["n_facts"])
    entry: dict[str, Any] = {"name": arm.name, "mode": arm.mode, "status": arm.status,
                             "settings": {k: v for k, v in arm.settings.items() if k not in ("n_facts", "seed")},
                             "n_facts": n_facts, "seed": seed, "v_star_key": arm.v_star_key,
                             "seconds": arm.seconds, "run_id": arm.run_id, "worker": arm.worker, "error": arm.error}
    if arm.mode == "independent":
        scores = arm_scores_frame(engine, arm.id)
        batches = arm_batches_frame(engine, arm.id)
        planned = len(batches_of(range(n_facts), int(arm.settings["batch_size"])))
        entry["progress"] = {"batches_done": len(batches), "batches": planned, "facts_scored": len(scores)}
        entry["metrics"] = {name: interval.to_dict() for name, interval in independent_metrics(scores, seed).items()}
        diagnostics = list(batches["diagnostics"])
        entry["v_star"] = {name: sum(int(d.get(f"v_star_{name}", 0)) for d in diagnostics)
                           for name in ("computed", "reused")}
        entry["timings"] = {part: float(sum(t.get(part, 0.0) for t in batches["timings"]))
                            for part in ("v_star", "keys", "solve", "evaluate", "batch")}
        entry["memorization"] = mean_memorization(diagnostics)
        entry["v_star"].update(_v_star_quality(engine, arm, seed))
        if entry["v_star"]["computed"]:
            entry["v_star"]["seconds_per_fact"] = entry["timings"]["v_star"] / entry["v_star"]["computed"]
    else:
        n_downstream = _n_downstream(arm)
        metrics, seq = sequential_metrics(engine, arm.run_id, seed, n_downstream) if arm.run_id else ({}, 0)
        entry["progress"] = {"evaluated_at_batch": seq}
        entry["metrics"] = {name: interval.to_dict() for name, interval in metrics.items()}
    return entry


def _n_downstream(arm: ArmInfo) -> int:
    from flows.settings import RunSettings

    settings = RunSettings.from_dict({k: v for k, v in arm.settings.items() if k not in ("n_facts", "seed")})
    return settings.evaluation_config().n_downstream


BATCH_SIZE_FACTORS = ({"batch_size"}, {"batch_size", "n_facts"})
"""Two arms that differ only in batch size (and perhaps in how many facts they score) are compared on the
facts both scored — between neighbouring batch sizes only, which is where a decline starts."""


def comparison_factor(a: dict[str, Any], b: dict[str, Any], batch_sizes: set[int]) -> str | None:
    """What two arms' :func:`_factors` differ in, when that is one factor a paired comparison isolates: the
    ``objective``, the ``distribution`` (layers) at one batch size, or the ``batch size`` between neighbours
    (no size of ``batch_sizes``, those of arms agreeing with both elsewhere, lies strictly between them)."""
    differing = {key for key in a if a[key] != b[key]}
    if differing == {"algorithm"}:
        return "objective"
    if differing in ({"layers", "distribution"}, {"layers"}):
        return "distribution"
    if differing in BATCH_SIZE_FACTORS:
        low, high = sorted((a["batch_size"], b["batch_size"]))
        return None if any(low < size < high for size in batch_sizes) else "batch size"
    return None


def differences(engine: Engine, arms: list[ArmInfo]) -> list[dict[str, Any]]:
    """Paired differences of independent arms that differ in one factor only (:func:`comparison_factor`), on
    the facts both scored."""
    found = []
    independent = [arm for arm in arms if arm.mode == "independent"]
    scores = {arm.id: arm_scores_frame(engine, arm.id).set_index("fact_id") for arm in independent}
    factors = {arm.id: _factors(arm) for arm in independent}
    for a, b in itertools.combinations(independent, 2):
        fa, fb = factors[a.id], factors[b.id]
        rest = {key for key in fa if key not in ("batch_size", "n_facts")}
        sizes = {f["batch_size"] for f in factors.values() if all(f[key] == fa[key] for key in rest)}
        factor = comparison_factor(fa, fb, sizes)
        if factor is None:
            continue
        shared = scores[a.id].index.intersection(scores[b.id].index)
        if len(shared) == 0:
            continue
        entry: dict[str, Any] = {"a": a.name, "b": b.name, "factor": factor, "n_facts": len(shared), "metrics": {}}
        for name in COMPARED:
            interval = paired_difference(scores[a.id].loc[shared, name].to_numpy(dtype=float),
                                         scores[b.id].loc[shared, name].to_numpy(dtype=float),
                                         seed=int(a.settings.get("seed", 0)))
            entry["metrics"][name] = {**interval.to_dict(), "different": interval.excludes(0.0)}
        found.append(entry)
    return found


def study_summary(engine: Engine, name: str) -> dict[str, Any]:
    study_id, spec, source = find_study(engine, name)
    arms = study_arms(engine, study_id)
    summaries = [arm_summary(engine, arm) for arm in arms]
    independent = [arm for arm in summaries if arm["mode"] == "independent"]
    v_star: dict[str, Any] = {name: sum(arm["v_star"][name] for arm in independent) for name in ("computed", "reused")}
    seconds = sum(arm["timings"]["v_star"] for arm in independent)
    v_star["seconds"] = seconds
    # estimated: each reused v* would have cost the mean time of those computed (batched as they were)
    v_star["seconds_saved"] = seconds / v_star["computed"] * v_star["reused"] if v_star["computed"] else 0.0
    return {"study": name, "fact_source": source, "arms": summaries, "v_star": v_star,
            "seconds": sum(arm["seconds"] or 0.0 for arm in summaries), "differences": differences(engine, arms)}


# -- the written report ---------------------------------------------------------------------------------------------
def _cell(metric: dict[str, Any] | None) -> str:
    if not metric or metric.get("mean") is None:
        return "–"
    if metric.get("low") is None:
        return f"{metric['mean']:.3f}"
    return f"{metric['mean']:.3f} [{metric['low']:.3f}, {metric['high']:.3f}]"


def _least_written(memorization: dict[str, float]) -> str:
    if not memorization:
        return "–"
    layer = min(memorization, key=memorization.get)
    return f"{memorization[layer]:.3f} (L{layer})"


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Study {summary['study']}", "",
             f"Facts: ledger source `{summary['fact_source']}`. Arms' wall time {summary['seconds']:.0f} s. v* "
             f"optimisations: {summary['v_star']['computed']} computed ({summary['v_star']['seconds']:.0f} s), "
             f"{summary['v_star']['reused']} reused (≈ {summary['v_star']['seconds_saved']:.0f} s saved). Intervals: "
             f"95 % bootstrap over facts (examples for downstream accuracy).", ""]
    independent = [arm for arm in summary["arms"] if arm["mode"] == "independent"]
    if independent:
        lines += ["## Independent arms (each batch edited into the unedited model, scored, undone)", "",
                  "| arm | objective | layers | B | facts | " + " | ".join(m.upper() for m in INDEPENDENT_METRICS)
                  + " | written (least layer) | v* steps | v* NLL | v* computed / reused | seconds |",
                  "|---" * (6 + len(INDEPENDENT_METRICS) + 4) + "|"]
        for arm in independent:
            settings = arm["settings"]
            layers = settings.get("edit_overrides", {}).get("layers", "–")
            lines.append(f"| {arm['name']} | {settings['algorithm']} | {layers} | {settings['batch_size']} | "
                         f"{arm['progress']['facts_scored']}/{arm['n_facts']} | "
                         + " | ".join(_cell(arm["metrics"].get(m)) for m in INDEPENDENT_METRICS)
                         + f" | {_least_written(arm['memorization'])} | {_cell(arm['v_star'].get('steps'))}"
                         + f" | {_cell(arm['v_star'].get('final_nll'))}"
                         + f" | {arm['v_star']['computed']} / {arm['v_star']['reused']} | "
                         f"{(arm['seconds'] or 0):.0f} |")
        lines.append("")
    sequential = [arm for arm in summary["arms"] if arm["mode"] == "sequential"]
    if sequential:
        names = sorted({name for arm in sequential for name in arm["metrics"]
                        if name in ("es", "ps", "ns", "retention.es") or name.startswith(("acc.", "ppl."))})
        lines += ["## Sequential arms (runs; metrics of the last full evaluation)", "",
                  "| arm | run | objective | B | at batch | " + " | ".join(names) + " |",
                  "|---" * (5 + len(names)) + "|"]
        for arm in sequential:
            lines.append(f"| {arm['name']} | {arm['run_id']} | {arm['settings']['algorithm']} | "
                         f"{arm['settings']['batch_size']} | {arm['progress']['evaluated_at_batch']} | "
                         + " | ".join(_cell(arm["metrics"].get(n)) for n in names) + " |")
        lines.append("")
    if summary["differences"]:
        lines += ["## Paired differences (a − b on the facts both scored; **bold**: the interval excludes 0)", "",
                  "| a | b | factor | facts | " + " | ".join(m.upper() for m in COMPARED) + " |",
                  "|---" * (4 + len(COMPARED)) + "|"]
        for entry in summary["differences"]:
            cells = []
            for name in COMPARED:
                metric = entry["metrics"][name]
                text = _cell(metric)
                cells.append(f"**{text}**" if metric.get("different") else text)
            lines.append(f"| {entry['a']} | {entry['b']} | {entry['factor']} | {entry['n_facts']} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def batch_scaling_figure(summary: dict[str, Any]):
    """Each metric against batch size (log₂), one line per objective × layers, the intervals as bands; None
    when no independent arm has results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [arm for arm in summary["arms"] if arm["mode"] == "independent" and arm["progress"]["facts_scored"]]
    if not arms:
        return None
    figure, axes = plt.subplots(1, len(FIGURE_METRICS), figsize=(4 * len(FIGURE_METRICS), 3.6), squeeze=False)
    lines: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for arm in arms:
        layers = arm["settings"].get("edit_overrides", {}).get("layers", [])
        label = f"{arm['settings']['algorithm']} L{','.join(map(str, layers))}"
        lines.setdefault((label, ""), []).append(arm)
    for axis, metric in zip(axes[0], FIGURE_METRICS):
        axis.set_title(metric.upper())
        measured = False
        for (label, _), members in sorted(lines.items()):
            members = sorted(members, key=lambda arm: arm["settings"]["batch_size"])
            sizes = np.array([arm["settings"]["batch_size"] for arm in members], dtype=float)
            values = [arm["metrics"].get(metric, {}) for arm in members]
            mean = np.array([np.nan if v.get("mean") is None else v["mean"] for v in values])
            if np.isnan(mean).all():  # e.g. GE of facts without generation prompts (the reduced schema)
                continue
            measured = True
            low = np.array([np.nan if v.get("low") is None else v["low"] for v in values])
            high = np.array([np.nan if v.get("high") is None else v["high"] for v in values])
            (line,) = axis.plot(sizes, mean, marker="o", label=label)
            axis.fill_between(sizes, low, high, color=line.get_color(), alpha=0.2)
        if not measured:  # a log axis without data cannot be drawn: say so instead
            axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
            axis.set_xticks([])
            axis.set_yticks([])
            continue
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"Study {summary['study']}: metrics against batch size (95 % bootstrap bands)")
    figure.tight_layout()
    return figure


def write_study_report(engine: Engine, name: str, out: Path) -> tuple[dict[str, Any], list[Path]]:
    """The markdown table, the batch-scaling figure and, for sequential arms, the lifelong comparison."""
    from flows.reporting import plot_comparison

    summary = study_summary(engine, name)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"study-{name}.md"]
    paths[0].write_text(markdown(summary))
    figure = batch_scaling_figure(summary)
    if figure is not None:
        import matplotlib.pyplot as plt

        paths.append(out / f"study-{name}-batch-scaling.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    run_ids = [arm["run_id"] for arm in summary["arms"]
               if arm["mode"] == "sequential" and arm["run_id"] and arm["progress"]["evaluated_at_batch"]]
    if run_ids:
        paths.append(plot_comparison(engine, run_ids, out / f"study-{name}-lifelong.png"))
    return summary, paths
