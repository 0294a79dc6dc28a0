"""``seqedit demo``: the main job on the embedded defaults, start to finish.

A fresh SQLite ledger in ``out/demo/``, the bundled CounterFact sample (200
records, source in ``editing/data/bundled/README.md``) ingested, EMMET on SmolLM2-135M in
batches of 8 with an evaluation every 2 batches (baseline first), the metric
table and the report plot, then a rollback of the run to batch 2 with its
weights rebuilt from the ledger and verified against the recorded hashes.
Everything goes through the same Prefect flows as ``seqedit run``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SAMPLE_SOURCE = "counterfact-sample"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="ingest a CounterFact sample, edit it with EMMET, report, roll back",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"),
                        help="folder for the ledger and the report, emptied first (default: out/demo)")
    parser.add_argument("--facts", type=int, default=32, help="facts to edit (default: 32, 4 batches of 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="facts per batch (default: 8)")
    parser.add_argument("--algo", dest="algorithm", choices=("memit", "emmet"), default="emmet",
                        help="objective (default: emmet)")
    parser.add_argument("--model", help="default: the embedded SmolLM2-135M")
    parser.set_defaults(handler=handle)


def sample_path() -> Path:
    """The demo's CounterFact sample (bundled with the package; a mirror's copy wins, see :mod:`editing.data`)."""
    from editing.data import resolve

    return resolve(SAMPLE_SOURCE).path


def handle(args: argparse.Namespace) -> int:
    import pandas as pd

    from db.engine import make_engine
    from db.history import batches_frame
    from db.migrate import upgrade
    from flows.commands.report import write_report
    from flows.pipeline import ingest_facts, rollback_run, sequential_edit
    from flows.reporting import metrics_wide, summary_table
    from flows.settings import RunSettings

    if args.facts < 3 * args.batch_size:
        raise ValueError(f"--facts must cover at least three batches ({3 * args.batch_size}) to show a rollback "
                         f"to batch 2")
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    url = f"sqlite:///{out / 'seqedit.db'}"
    engine = make_engine(url)

    _step(f"1. ledger: {url}")
    upgrade(url)
    _step(f"2. ingest {sample_path().name} (source {SAMPLE_SOURCE!r})")
    summary = ingest_facts(path=str(sample_path()), source=SAMPLE_SOURCE, db_url=url)
    print(f"{summary['records']} records: {summary['accepted']} accepted, {summary['rejected']} rejected, "
          f"{summary['duplicates']} duplicates")

    _step(f"3. run {args.algorithm} on {args.facts} facts, batches of {args.batch_size}, evaluation every 2 batches")
    settings = RunSettings(algorithm=args.algorithm, model=args.model, batch_size=args.batch_size, eval_every=2,
                           limit=args.facts, fact_source=SAMPLE_SOURCE, evaluation_profile="quick",
                           retention_sample=None, name="demo")
    outcome = sequential_edit(settings=settings.to_dict(), db_url=url)
    run_id = outcome["run_id"]

    _step("4. metrics per evaluation (seq 0 is the baseline before any edit)")
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print(summary_table(metrics_wide(engine, run_id, kind="full")).to_string(index=False))
    plot, markdown, _ = write_report(engine, run_id, out / "report")
    print(f"\nplot:    {plot}\nsummary: {markdown}")

    _step(f"5. rollback of run {run_id} to batch 2 (weights rebuilt from the ledger, sha256-verified)")
    before = outcome["weights_sha256"]
    rolled = rollback_run(run_id=run_id, to_seq=2, db_url=url)
    changed = sorted(layer for layer in rolled["weights_sha256"] if rolled["weights_sha256"][layer] != before[layer])
    print(f"layers {changed} now hold their state after batch 2")
    batches = batches_frame(engine, run_id)
    print(batches[["seq", "status", "n_facts", "rolled_back_to"]].to_string(index=False))

    _step("next")
    print(f"seqedit history --db {url} --run {run_id} --metrics\n"
          f"seqedit run --db {url} --resume {run_id}        # re-edit batches 3.. from the restored state\n"
          f"seqedit export --db {url} --run {run_id} --out {out / 'export'}")
    return 0


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)
