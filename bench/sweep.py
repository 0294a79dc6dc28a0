"""Hyperparameter sweep: ES/PS/NS/S after one batch edit, for several configurations.

Each configuration is a set of dotted overrides of the model's YAML section for
the algorithm (``"algorithm"`` itself may be overridden per configuration); the
model is restored between configurations. Configurations that share the last
edit layer and the v* settings reuse one v* optimisation, so comparing
objectives or sweeping λ costs little beyond the first — and the comparison is
of the objectives alone, on identical target values.

    python bench/sweep.py --algo emmet --facts 16 \\
        --config '{"layers": [4]}' --config '{"layers": [6]}' \\
        --config '{"layers": [3,4,5,6,7], "objective.mom2_update_weight": 5000}'
    python bench/sweep.py --facts 128 --config '{"algorithm": "emmet"}' --config '{"algorithm": "memit"}'
    python bench/sweep.py --data ../shared/data/counterfact/counterfact-easyedit-train.json --facts 64 \
        --algo memit --config '{"objective.mom2_update_weight": 2000}' --config '{"objective.mom2_update_weight": 5000}'

Each row also gives the memorization each layer achieved (``1 − ‖Ŵ K_E − V_E‖ / ‖R‖``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from editing.config import EditConfig, hparams_key_for, load_edit_config
from editing.editor import null_spaces_for
from editing.distribution import LayerSolver, distribute, get_distribution
from editing.evaluation import counterfact_metrics
from editing.facts import fact_from_record
from editing.rows import build_rewrite_rows
from editing.v_star import VStar, compute_v_star
from editing.models import load_model
from editing.norm_anchor import anchor_norm
from editing.prefixes import generate_prefixes
from editing.stats import second_moments
from flows.commands.common import ALGORITHMS
from flows.one_shot import METRIC_KEYS

COUNTERFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact" / "counterfact-1000.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="emmet", choices=ALGORITHMS)
    parser.add_argument("--facts", type=int, default=16)
    parser.add_argument("--data", type=Path, default=COUNTERFACT, help="CounterFact JSON (full or EasyEdit schema)")
    parser.add_argument("--offset", type=int, default=0, help="first record used")
    parser.add_argument("--model", default=None)
    parser.add_argument("--config", action="append", default=[], help="JSON object of dotted overrides")
    parser.add_argument("--json", action="store_true", help="finish with one JSON object of all tables")
    args = parser.parse_args()

    adapter = load_model(args.model)
    key = hparams_key_for(adapter.name)
    records = json.loads(args.data.read_text())[args.offset:args.offset + args.facts]
    facts = [fact_from_record(record, args.offset + index) for index, record in enumerate(records)]
    pre = counterfact_metrics(adapter, facts).metrics()
    print(f"{'pre':70s} {table_row(pre)}  ({len(facts)} facts)", flush=True)
    results: list[dict[str, object]] = []
    prefix_cache: dict[tuple[int, int], tuple[str, ...]] = {}
    value_cache: dict[str, VStar] = {}
    for overrides in [json.loads(text) for text in args.config] or [{}]:
        algorithm = overrides.get("algorithm", args.algo)
        config: EditConfig = load_edit_config(key, algorithm, {k: v for k, v in overrides.items() if k != "algorithm"})
        layers = get_distribution(config.distribution).edit_layers(config.layers)
        original = adapter.snapshot(list(layers))
        started = time.perf_counter()
        moments = second_moments(adapter, list(layers), config.stats)
        prefix_key = (config.values.n_prefixes, config.values.prefix_tokens)
        if prefix_key not in prefix_cache:
            prefix_cache[prefix_key] = generate_prefixes(adapter, *prefix_key)
        prefixes = prefix_cache[prefix_key]
        value_key = json.dumps([layers[-1], config.to_dict()["values"]])
        if value_key not in value_cache:
            anchor = anchor_norm(adapter, layers[-1], config.values) if config.values.norm_anchor_scaling else None
            value_cache[value_key] = compute_v_star(adapter, facts, layers[-1], prefixes, config.values, anchor=anchor)
        values_seconds = time.perf_counter() - started
        values = value_cache[value_key]
        rows = build_rewrite_rows(adapter, facts, prefixes, with_targets=False)
        solver = LayerSolver(config.algorithm, config.objective, {l: moments[l].to(adapter.device) for l in layers},
                             null_spaces=null_spaces_for(adapter, config))
        updates = distribute(adapter, rows, values.z, layers, get_distribution(config.distribution), solver)
        solve_seconds = time.perf_counter() - started - values_seconds
        post = counterfact_metrics(adapter, facts).metrics()
        norms = [round(u.delta.norm(), 2) for u in updates]
        memorization = [round(u.memorization, 3) for u in updates]
        adapter.restore(original)
        print(f"{json.dumps(overrides):70s} {table_row(post)}  v*NLL {float(values.final_nll.mean()):.3f}  "
              f"steps {float(values.steps.float().mean()):.1f}  |ΔW| {norms}  mem {memorization}  "
              f"v* {values_seconds:.0f}s  total {time.perf_counter() - started:.0f}s", flush=True)
        results.append({"overrides": overrides, "config": config.to_dict(), "post": post, "delta_norms": norms,
                        "memorization": memorization, "v_star_steps": float(values.steps.float().mean()),
                        "seconds": {"stats_and_v_star": values_seconds, "keys_and_solve": solve_seconds}})
    if args.json:
        print(json.dumps({"data": str(args.data), "n_facts": len(facts), "offset": args.offset, "pre": pre,
                          "results": results}))
    return 0


def table_row(metrics: dict[str, float]) -> str:
    """The CounterFact table's columns, as ``seqedit edit --json`` reports them."""
    return "  ".join(f"{name} {metrics.get(name.lower(), float('nan')):.3f}" for name in METRIC_KEYS)


if __name__ == "__main__":
    sys.exit(main())
