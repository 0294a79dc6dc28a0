"""Drift of sequential edits on a bfloat16 model, with and without the float32 master.

Three runs of the same facts in the same order through the real pipeline (one SQLite ledger):
``fp32`` (the model in float32: the reference trajectory), ``bf16-master`` (bfloat16 with each edited matrix
kept as a float32 master, the default) and ``bf16-plain`` (``runtime.float32_master: false``: each ΔW rounded
to bfloat16 and added to bfloat16 weights). At each checkpoint it prints, per edited layer,
``‖W − W_fp32‖ / ‖W_fp32 − W0‖`` with ``W`` the weights the model computes with (the master's rounding, or the
plain bfloat16 weights), and each run's ES/PS/NS and WikiText-2 perplexity at its evaluations.

    python bench/bf16_drift.py --edits 500 --batch-size 25 --checkpoints 100,250,500
    python bench/bf16_drift.py --edits 100 --batch-size 20 --checkpoints 20,60,100 --set values.n_prefixes=0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from db.engine import make_engine
from db.history import metrics_frame
from db.ingest import ingest_file
from db.migrate import upgrade
from db.replay import weights_at
from flows.commands.common import parse_override
from flows.pipeline import sequential_edit

FACTS = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact"
         / "counterfact-easyedit-edit.json")
RUNS = {"fp32": {"device": "cpu", "dtype": "float32"},
        "bf16-master": {"device": "cpu", "dtype": "bfloat16"},
        "bf16-plain": {"device": "cpu", "dtype": "bfloat16", "float32_master": False}}
METRICS = ("es", "ps", "ns", "ppl.wikitext-2-test")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--checkpoints", default="100,250,500", help="edit counts at which drift is measured")
    parser.add_argument("--algorithm", default="memit")
    parser.add_argument("--eval-every", type=int, default=None, help="batches between evaluations (default: the "
                        "first checkpoint's)")
    parser.add_argument("--facts", type=Path, default=FACTS, help="CounterFact records (never used for tuning)")
    parser.add_argument("--db", help="ledger URL (default: a temporary SQLite file)")
    parser.add_argument("--set", dest="edit_set", type=parse_override, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="edit overrides for all three runs, e.g. values.n_prefixes=0 stats.n_samples=500")
    args = parser.parse_args()
    checkpoints = [int(n) for n in args.checkpoints.split(",")]
    if any(n % args.batch_size for n in checkpoints):
        parser.error("every checkpoint must be a multiple of --batch-size")
    url = args.db or f"sqlite:///{tempfile.mkdtemp(prefix='bf16-drift-')}/ledger.db"
    upgrade(url)
    engine = make_engine(url)
    records = json.loads(args.facts.read_text())[: args.edits]
    subset = Path(tempfile.mkdtemp()) / "facts.json"
    subset.write_text(json.dumps(records))
    ingest_file(engine, subset, source="drift")
    eval_every = args.eval_every or max(1, min(checkpoints) // args.batch_size)
    overrides = dict(args.edit_set)
    run_ids, seconds = {}, {}
    for name, runtime in RUNS.items():
        settings = {"name": f"bf16-drift/{name}", "algorithm": args.algorithm, "batch_size": args.batch_size,
                    "limit": args.edits, "fact_source": "drift", "fact_pool": "private", "runtime": runtime,
                    "eval_every": eval_every, "evaluation_profile": "quick", "health_checks": False,
                    "evaluation_overrides": {"downstream_tasks": [], "perplexity_corpora": ["wikitext-2-test"],
                                             "generation": False, "wild": False},
                    "collapse": {"action": "warn"}, "edit_overrides": overrides}
        started = time.perf_counter()
        run_ids[name] = sequential_edit(settings=settings, db_url=url)["run_id"]
        seconds[name] = time.perf_counter() - started
        print(f"{name}: run {run_ids[name]}, {seconds[name]:.0f} s", flush=True)
    print(f"\n‖W − W_fp32‖ / ‖W_fp32 − W0‖ per layer (W as the model computes with it), {args.algorithm}, "
          f"B = {args.batch_size}")
    origin = weights_at(engine, run_ids["fp32"], 0)
    for edits in checkpoints:
        seq = edits // args.batch_size
        reference = weights_at(engine, run_ids["fp32"], seq)
        for name in ("bf16-master", "bf16-plain"):
            weights = weights_at(engine, run_ids[name], seq)
            drift = {layer: float(torch.linalg.matrix_norm(weights[layer].to(torch.bfloat16).double()
                                                           - reference[layer].double())
                                  / torch.linalg.matrix_norm(reference[layer].double() - origin[layer].double()))
                     for layer in sorted(reference)}
            print(f"  {edits:5d} edits  {name:12s} " + "  ".join(f"L{layer} {value:.4f}" for layer, value in drift.items()))
    print("\nmetrics at the evaluations (ES/PS/NS of the evaluated batch, WikiText-2 perplexity)")
    for name, run_id in run_ids.items():
        frame = metrics_frame(engine, run_id, kind="full")
        frame = frame[frame["name"].isin(METRICS)].pivot_table(index="seq", columns="name", values="value")
        for seq, row in frame.iterrows():
            print(f"  {name:12s} {int(seq) * args.batch_size:5d} edits  "
                  + "  ".join(f"{metric} {row.get(metric, float('nan')):.3f}" for metric in METRICS))
    print("\nwall seconds: " + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
