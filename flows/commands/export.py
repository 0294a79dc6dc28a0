"""``seqedit export --run ID --out DIR``: a run's ledger as files (CSV or Parquet, via pandas).

Writes ``metrics.<ext>`` (long: seq, name, split, value, evaluation status — rolled-back
evaluations included), ``metrics_wide.<ext>`` (one row per active evaluation), ``batches``,
``evaluations``, ``alarms`` and ``facts`` (the facts of the run's batches, with the batch they
were in). Weight deltas stay in the database: they are tensors, replayed by ``rollback``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write a run's metrics and ledger to CSV or Parquet",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=int, required=True, metavar="RUN_ID", help="the run to export")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder to write into (created; a non-empty one is refused unless --force)")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv", help="file format (default: csv)")
    parser.add_argument("--force", action="store_true", help="overwrite the tables of a non-empty --out folder")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.set_defaults(handler=handle)


def export_run(engine, run_id: int, out: Path, file_format: str, force: bool = False) -> dict[str, Path]:
    """Write the run's tables; returns table name → path. A non-empty ``out`` is refused unless ``force``
    (as ``export-model`` refuses one): an earlier export is not overwritten by accident."""
    from db.history import alarms_frame, batches_frame, evaluations_frame, metrics_frame, run_facts_frame
    from db.runs import get_run
    from flows.reporting import metrics_wide

    get_run(engine, run_id)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"--out {out} exists and is not an empty folder; choose another or pass --force")
    tables = {"metrics": metrics_frame(engine, run_id, include_rolled_back=True),
              "metrics_wide": metrics_wide(engine, run_id),
              "batches": batches_frame(engine, run_id),
              "evaluations": evaluations_frame(engine, run_id, include_rolled_back=True),
              "alarms": alarms_frame(engine, run_id),
              "facts": run_facts_frame(engine, run_id)}
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, frame in tables.items():
        path = out / f"{name}.{file_format}"
        if file_format == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        written[name] = path
    return written


def handle(args: argparse.Namespace) -> int:
    from flows.commands.common import open_ledger

    engine = open_ledger(args.db, read_only=True)
    for name, path in export_run(engine, args.run, args.out, args.format, args.force).items():
        print(f"{name:14s} {path}")
    return 0
