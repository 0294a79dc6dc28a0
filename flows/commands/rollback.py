"""``seqedit rollback --run ID --to N``: restore a run to batch N (verified), keeping the later history."""

from __future__ import annotations

import argparse
import json

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rollback", help="restore a run to an earlier batch", description=__doc__)
    parser.add_argument("--run", type=int, required=True, metavar="RUN_ID")
    parser.add_argument("--to", type=int, required=True, metavar="N", help="the batch to return to (0: the original)")
    parser.add_argument("--keep-facts-out", action="store_true",
                        help="mark the rolled-back facts rolled_back instead of returning them to the queue")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from flows.pipeline import rollback_run

    outcome = rollback_run(run_id=args.run, to_seq=args.to, restore_facts=not args.keep_facts_out, db_url=args.db)
    if args.json:
        print(json.dumps(outcome))
    else:
        for layer, sha in sorted(outcome["weights_sha256"].items()):
            print(f"layer {layer}: sha256 {sha}")
    return 0
