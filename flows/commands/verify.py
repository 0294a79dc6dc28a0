"""``seqedit verify --run N``: prove that run N's ledger is what was committed (:mod:`db.audit`).

Recomputes the hash chain over its batches, every evaluation's seal, replays every delta from the original
weights (ignoring checkpoints) and then checks every checkpoint. Prints the first problem of each kind it finds —
batch, fact or layer, and field — and exits 0 only when everything holds. It only reads: an auditor's
SELECT-only role is enough. Write down the printed head; ``--expect HEAD`` later proves the chain was not
rewritten as a whole.
"""

from __future__ import annotations

import argparse
import json

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("verify", help="prove a run's ledger untouched: hash chain, replay, checkpoints",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=int, required=True, metavar="RUN_ID", help="the run to verify")
    parser.add_argument("--expect", metavar="HEAD", help="the chain head recorded earlier: fail unless it is still "
                        "the head or a batch of the chain (a rewrite from an earlier batch on changes it)")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from db.audit import Problem, verify_run
    from db.engine import transaction
    from db.models import BatchRecord, BatchStatus
    from flows.commands.common import open_ledger

    engine = open_ledger(args.db, read_only=True)
    result = verify_run(engine, args.run)
    if args.expect:
        with transaction(engine) as session:
            chain = set(session.scalars(select(BatchRecord.chain_sha256).where(
                BatchRecord.run_id == args.run, BatchRecord.status == BatchStatus.APPLIED)))
        if args.expect not in chain:
            result.problems.append(Problem("chain", "head", f"{args.expect} is not the chain hash of any applied "
                                                            f"batch of run {args.run}: the chain was rewritten"))
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0 if result.ok else 1
    checked = (f"{result.batches} batches, {result.evaluations} evaluations, {result.replayed} batches replayed "
               f"from the original weights, {result.checkpoints} checkpoints")
    if result.ok:
        print(f"run {args.run}: verified — {checked}; chain head {result.head}")
        return 0
    print(f"run {args.run}: NOT verified ({len(result.problems)} problems; checked {checked})")
    for problem in result.problems:
        print(f"  {problem}")
    return 1
