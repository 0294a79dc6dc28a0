"""``seqedit trace [--model M] [--facts FILE] [--limit N] --out DIR``: where a model recalls facts, and which
layers to edit.

ROME's causal tracing (:mod:`editing.causal_trace`) on the facts of FILE (default: ROME's ``known_1000``;
any CounterFact-style file works, traced on each record's prompt and true target): the indirect effect of
restoring the hidden state, the MLP output and the attention output at each layer and token role after the
subject is corrupted, averaged over facts. Writes into DIR:

* ``trace.png`` — the three heatmaps (layers × token roles) and the MLP curve at the last subject token;
* ``trace.json`` — the averaged effects, p(clean) and p(corrupted), and every fact's own tables;
* ``<model>-traced.yaml`` — a skeleton hparams file whose edit layers are the suggested window: the
  ``--width`` consecutive layers (5, as MEMIT's) with the largest summed MLP effect at the last subject
  token, and ROME's single layer at that curve's peak. Use it with ``--hparams DIR/<model>-traced.yaml``.

Only facts the model knows are traced (its top prediction is the first token of the answer, as ROME selects),
the first ``--limit`` of them; ``--all-facts`` traces the first ``--limit`` whatever the model predicts.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Mapping

from flows.commands.common import add_runtime_options, runtime_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("trace", help="causal tracing: where facts are recalled, and a suggested "
                                                 "edit-layer window", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model name or path (default: the embedded SmolLM2-135M)")
    parser.add_argument("--facts", help="fact file or catalog dataset (default: known_1000)")
    parser.add_argument("--limit", type=int, default=50, help="facts traced (default 50)")
    parser.add_argument("--all-facts", action="store_true", help="trace every fact, not only those the model knows "
                        "(whose top prediction is the first token of the answer, ROME's selection)")
    parser.add_argument("--out", type=Path, required=True, help="folder for trace.png, trace.json and the hparams")
    parser.add_argument("--samples", type=int, default=10, help="noise draws per fact (default 10, ROME's)")
    parser.add_argument("--noise", type=float, default=3.0, help="noise std in embedding stds (default 3, ROME's)")
    parser.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn (default 10)")
    parser.add_argument("--kinds", default="hidden,mlp,attn", help="states restored (default hidden,mlp,attn)")
    parser.add_argument("--width", type=int, default=5, help="layers in the suggested edit window (default 5)")
    add_runtime_options(parser)
    parser.set_defaults(handler=handle)


def trace_facts_of(records: list[Mapping[str, Any]], where: str) -> list:
    """Trace facts from ``known_1000`` records (``subject``, ``prompt``) or CounterFact-style ones
    (``requested_rewrite``: traced on the prompt and the true target)."""
    from editing.causal_trace import TraceFact
    from editing.facts import fact_from_record

    facts = []
    for index, record in enumerate(records):
        if isinstance(record, Mapping) and "requested_rewrite" not in record and "prompt" in record:
            if "subject" not in record or str(record["subject"]) not in str(record["prompt"]):
                raise ValueError(f"{where} record {index}: 'subject' must occur in 'prompt'")
            facts.append(TraceFact(str(record["prompt"]), str(record["subject"]), str(record.get("attribute", ""))))
        else:
            fact = fact_from_record(record, f"{where} record {index}")
            facts.append(TraceFact(fact.rewrite_prompt, fact.subject, fact.target_true))
    return facts


def handle(args: argparse.Namespace) -> int:
    from editing.causal_trace import KINDS, TraceSettings, known_facts, peak_layer, suggest_layers, trace_facts
    from editing.data import resolve
    from editing.models import load_model
    from editing.runtime import Runtime

    kinds = tuple(kind for kind in args.kinds.split(",") if kind)
    settings = TraceSettings(samples=args.samples, noise=args.noise, window=args.window, kinds=kinds)
    if "mlp" not in kinds:
        raise ValueError(f"--kinds must include mlp: the suggested window is read off the MLP effect "
                         f"(got {args.kinds!r}; known {', '.join(KINDS)})")
    path = Path(args.facts) if args.facts and Path(args.facts).is_file() else \
        resolve(args.facts or "known_1000", root=getattr(args, "data_dir", None)).path
    facts = trace_facts_of(json.loads(path.read_text()), path.name)
    runtime = Runtime(**runtime_from_args(args))
    runtime.apply_threads()
    placement = {"device_map": runtime.device_map} if runtime.device_map is not None else \
        {"device": runtime.torch_device}
    adapter = load_model(args.model, dtype=runtime.model_dtype, **placement)
    candidates = len(facts)
    facts = facts[:args.limit] if args.all_facts else known_facts(adapter, facts, args.limit)
    if not facts:
        raise ValueError(f"{path.name}: the model knows none of its {candidates} facts (--all-facts traces them anyway)")
    summary = trace_facts(adapter, facts, settings)
    window, peak = suggest_layers(summary, args.width), peak_layer(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    model_name = adapter.name
    write_trace_json(args.out / "trace.json", summary, model_name, settings, window, peak, path.name)
    plot_trace(args.out / "trace.png", summary, model_name)
    hparams = args.out / f"{_slug(model_name)}-traced.yaml"
    hparams.write_text(skeleton_hparams(model_name, adapter.n_layers, window, peak, summary.n_facts, path.name))
    print(f"{summary.n_facts} facts of {path.name} on {model_name}: p(answer) clean {summary.p_clean:.3f}, "
          f"corrupted {summary.p_corrupted:.3f}")
    print(f"MLP indirect effect at the last subject token peaks at layer {peak}; suggested edit window "
          f"{window[0]}-{window[-1]} (the {len(window)} consecutive layers with the largest summed effect)")
    for name in ("trace.png", "trace.json", hparams.name):
        print(f"  {args.out / name}")
    return 0


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", Path(name).name.lower()).strip("-") or "model"


def write_trace_json(path: Path, summary, model: str, settings, window, peak: int, facts: str) -> None:
    from dataclasses import asdict

    def table(array):
        return [[None if value != value else round(float(value), 6) for value in row] for row in array]

    from editing.causal_trace import ROLES
    document = {"model": model, "facts": facts, "n_facts": summary.n_facts, "settings": asdict(settings),
                "p_clean": summary.p_clean, "p_corrupted": summary.p_corrupted, "roles": list(ROLES),
                "indirect_effect": {kind: table(values) for kind, values in summary.effect.items()},
                "peak_layer": peak, "suggested_layers": list(window),
                "rule": "the consecutive layers with the largest summed MLP indirect effect at the last subject token",
                "per_fact": [{"prompt": t.fact.prompt, "subject": t.fact.subject, "answer": t.answer_token,
                              "p_clean": t.p_clean, "p_corrupted": t.p_corrupted, "tokens": t.tokens,
                              "restored": {kind: table(values) for kind, values in t.restored.items()}}
                             for t in summary.traces]}
    path.write_text(json.dumps(document, indent=1) + "\n")


def plot_trace(path: Path, summary, model: str) -> None:
    """One heatmap per restored kind (layers across, token roles down), and the MLP curve at the last
    subject token with the curves of the other kinds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from editing.causal_trace import ROLES
    kinds = list(summary.effect)
    figure, axes = plt.subplots(1, len(kinds) + 1, figsize=(4.2 * (len(kinds) + 1), 3.4))
    titles = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}
    colours = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
    for axis, kind in zip(axes, kinds):
        image = axis.imshow(summary.effect[kind].T, aspect="auto", cmap=colours[kind], interpolation="nearest")
        axis.set_yticks(range(len(ROLES)), ROLES, fontsize=8)
        axis.set_xlabel("layer")
        axis.set_title(f"restoring the {titles[kind]}", fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.046, label="indirect effect")
    curve_axis = axes[-1]
    for kind in kinds:
        curve = summary.effect[kind][:, ROLES.index("last subject")]
        curve_axis.plot(np.arange(len(curve)), curve, label=titles[kind], color=plt.get_cmap(colours[kind])(0.7))
    curve_axis.set_xlabel("layer")
    curve_axis.set_title("at the last subject token", fontsize=9)
    curve_axis.legend(fontsize=7)
    figure.suptitle(f"causal trace of {model}: {summary.n_facts} facts, p clean {summary.p_clean:.2f}, "
                    f"corrupted {summary.p_corrupted:.2f}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def skeleton_hparams(model: str, n_layers: int, window, peak: int, n_facts: int, facts: str) -> str:
    """An hparams file for a model seqedit ships none for: the traced layers, and the references' original
    v* and C0 settings (MEMIT's) as a starting point to tune on a training slice."""
    layers = ", ".join(str(layer) for layer in window)
    sections = "\n".join(f"{name}:\n  layers: [{layers}]\n  distribution: memit_spread\n  objective: {objective}"
                         for name, objective in (("memit", "{mom2_update_weight: 15000}"),
                                                 ("emmet", "{mom2_update_weight: 1, emmet_lambda: 0.1}"),
                                                 ("alphaedit", "{nullspace_threshold: 0.02, alphaedit_ridge: 10}"),
                                                 ("encore", "{mom2_update_weight: 15000, update_norm_lambda: 10}")))
    return f"""# Skeleton hparams for {model} ({n_layers} layers), written by `seqedit trace` from {n_facts} facts of {facts}.
# Edit layers: the {len(window)} consecutive layers with the largest summed MLP indirect effect at the last
# subject token ({window[0]}-{window[-1]}); ROME's single layer: that effect's peak ({peak}). v* and C0: the
# references' original settings (MEMIT's), not tuned for this model: tune λ and the v* settings on a training
# slice (bench/sweep.py) before trusting numbers.
match: ["{_slug(model)}"]
defaults:
  values: {{lr: 0.5, steps: 25, clamp_norm_factor: 4.0, kl_factor: 0.0625, weight_decay: 0.001,
           n_prefixes: 5, prefix_tokens: 10}}
  stats: {{corpus: wikipedia-leads, n_samples: 10000, max_tokens: 128}}
rome:
  layers: [{peak}]
  distribution: single_layer
  values: {{norm_anchor: mlp_output}}
{sections}
"""
