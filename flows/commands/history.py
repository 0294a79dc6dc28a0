"""``seqedit history``: what the ledger holds, as tables (or ``--json`` records).

* no option: every run;
* ``--run ID``: the run's batches (status, facts, timings) — add ``--metrics`` for its metric
  values per evaluation, ``--alarms`` for its collapse alarms;
* ``--subject TEXT``: the timeline of every fact whose subject contains TEXT (any case), across runs: batch,
  time, status (applied, rolled back, retracted, superseded), the evaluation nearest after it — add ``--now``
  for what the model at each run's latest point answers (P(new), P(old), its greedy answer; loads the model).

Runs show their lineage: a branch made by ``seqedit retract`` names its parent, the batch it branches from,
the fact it retracts and the reason.
"""

from __future__ import annotations

import argparse

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("history", help="runs, batches, metrics and edits recorded in the ledger",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=int, metavar="RUN_ID", help="one run's batches")
    parser.add_argument("--metrics", action="store_true", help="with --run: metric values per evaluation")
    parser.add_argument("--alarms", action="store_true", help="with --run: collapse alarms")
    parser.add_argument("--subject", help="every edit of a subject containing this text (any case), in any run")
    parser.add_argument("--now", action="store_true", help="with --subject: what each run's latest model answers "
                        "(loads the model)")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--json", action="store_true", help="print records as JSON")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import pandas as pd

    from db.history import alarms_frame, batches_frame, runs_frame, subject_timeline
    from db.runs import get_run
    from flows.commands.common import open_ledger
    from flows.reporting import metrics_wide

    engine = open_ledger(args.db, read_only=True)
    if (args.metrics or args.alarms) and args.run is None:
        raise ValueError("--metrics and --alarms need --run RUN_ID")
    if args.now and args.subject is None:
        raise ValueError("--now needs --subject TEXT")
    if args.subject is not None:
        frame = subject_timeline(engine, args.subject)
        if args.now and not frame.empty:
            from flows.subject_answers import answers_now

            frame = answers_now(engine, frame)
    elif args.run is not None:
        get_run(engine, args.run)  # a clear error for an unknown run
        frame = (metrics_wide(engine, args.run) if args.metrics else
                 alarms_frame(engine, args.run) if args.alarms else batches_frame(engine, args.run))
    else:
        frame = runs_frame(engine)
    if args.json:
        print(frame.to_json(orient="records", date_format="iso", default_handler=str))
        return 0
    if frame.empty:
        print(f"(no fact about a subject containing {args.subject!r}; the match ignores case)"
              if args.subject is not None else "(nothing recorded)")
        return 0
    frame = frame.astype(object).where(frame.notna(), "")  # an unnamed run shows nothing, not NaN
    with pd.option_context("display.max_rows", 500, "display.max_columns", 40, "display.width", 200,
                           "display.float_format", "{:.4f}".format):
        print(frame.drop(columns=[c for c in ("claimed_at", "finished_at") if c in frame and args.run], errors="ignore")
              .to_string(index=False))
    return 0
