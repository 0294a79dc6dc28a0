"""``seqedit retract --run N --fact ID [--reason TEXT]``: undo one wrong fact without losing the edits after it.

Creates a new run that branches from run N at the batch before the fact's batch (sharing that history, chain
hashes and all), then edits the facts of N's later batches again without the retracted one — recomputed,
because those batches were solved on weights that contained it. Run N's history stays as it was;
``seqedit history`` shows the branch's parent, point and reason. ``--no-edit`` only records the branch (edit it
later with ``seqedit run --resume BRANCH``).
"""

from __future__ import annotations

import argparse
import json

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("retract", help="branch a run without one fact and redo the edits after it",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=int, required=True, metavar="RUN_ID", help="the run that edited the fact")
    parser.add_argument("--fact", type=int, required=True, metavar="FACT_ID", help="the fact to retract")
    parser.add_argument("--reason", help="why (recorded with the branch)")
    parser.add_argument("--no-edit", action="store_true", help="record the branch only; do not edit yet")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from db.branch import create_branch, fact_batch
    from db.runs import get_run
    from flows.commands.common import check_run_datasets, open_ledger

    engine = open_ledger(args.db)
    seq = fact_batch(engine, args.run, args.fact)  # one line before anything is written: not in the run's history
    check_run_datasets(get_run(engine, args.run))
    branch = create_branch(engine, args.run, args.fact, args.reason)
    said = (f"run {branch.id} branches from run {args.run} after batch {seq - 1}, without fact {args.fact} "
            f"(edited in batch {seq})")
    outcome = {"run_id": branch.id, "parent_run_id": args.run, "parent_seq": seq - 1, "retracted_fact_id": args.fact}
    if not args.no_edit:
        from flows.pipeline import sequential_edit

        outcome.update(sequential_edit(run_id=branch.id, db_url=args.db))
        said += f"; edited to batch {outcome['seq']} ({outcome['status']})"
    print(json.dumps(outcome) if args.json else f"{said}; see `seqedit history --run {branch.id}`")
    return 0
