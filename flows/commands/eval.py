"""``seqedit eval --run ID [--seq N]``: evaluate a run at a recorded batch (restored first) and record it."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a run at any recorded batch", description=__doc__)
    parser.add_argument("--run", type=int, required=True, metavar="RUN_ID", help="the run to evaluate")
    parser.add_argument("--seq", type=int, help="batch sequence number (default: the run's last applied batch)")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from db.replay import last_applied_seq
    from db.runs import get_run
    from flows.commands.common import check_run_datasets, open_ledger
    from flows.pipeline import evaluate_run

    engine = open_ledger(args.db)
    last = last_applied_seq(engine, args.run)  # an unknown run is refused here
    if args.seq is not None and not 0 <= args.seq <= last:
        raise ValueError(f"--seq {args.seq}: run {args.run} has applied batches 0-{last}")
    check_run_datasets(get_run(engine, args.run))
    metrics = evaluate_run(run_id=args.run, seq=args.seq, db_url=args.db)
    if args.json:
        print(json.dumps(metrics))
    else:
        for name, value in sorted(metrics.items()):
            print(f"{name:28s} {value:10.4f}")
    return 0
