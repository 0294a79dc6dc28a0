"""``seqedit rollback --run ID --to N``: restore a run to batch N (verified), keeping the later history.

The later batches stay in the ledger, marked rolled back, and their facts return to the queue (or, with
``--keep-facts-out``, are marked rolled back too). A run already at batch N is left as it is: nothing is
recorded. The run, the batch and the writer lock are checked before anything starts.
"""

from __future__ import annotations

import argparse
import json

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rollback", help="restore a run to an earlier batch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=int, required=True, metavar="RUN_ID", help="the run to roll back")
    parser.add_argument("--to", type=int, required=True, metavar="N", help="the batch to return to (0: the original)")
    parser.add_argument("--keep-facts-out", action="store_true",
                        help="mark the rolled-back facts rolled_back instead of returning them to the queue")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--json", action="store_true",
                        help="print {run_id, seq, rolled_back, weights_sha256} as JSON (and nothing else)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from db.replay import last_applied_seq
    from flows.commands.common import check_writer_free, open_ledger
    from flows.pipeline import rollback_run

    engine = open_ledger(args.db)
    last = last_applied_seq(engine, args.run)  # an unknown run is refused here
    if not 0 <= args.to <= last:
        raise ValueError(f"--to {args.to}: run {args.run} has applied batches 0-{last} (0: before any edit)")
    check_writer_free(engine, args.run)
    outcome = rollback_run(run_id=args.run, to_seq=args.to, restore_facts=not args.keep_facts_out, db_url=args.db)
    if args.json:
        print(json.dumps(outcome))
        return 0
    if outcome["rolled_back"]:
        print(f"run {args.run} rolled back to batch {args.to}; layer hashes verified")
    else:
        print(f"run {args.run} is at batch {args.to} already: nothing rolled back, nothing recorded")
    for layer, sha in sorted(outcome["weights_sha256"].items()):
        print(f"layer {layer}: sha256 {sha}")
    return 0
