"""``seqedit ingest PATH [--source NAME] [--db URL] [--json]``: validate and store facts.

PATH is a CounterFact JSON file (full or EasyEdit schema), JSONL, CSV, or a
folder saved by ``datasets``; see :mod:`db.readers`. Rejected records are kept
in the ledger with their reason; the summary says how many of each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ingest", help="load facts from a file or dataset into the ledger",
                                   description="Validate every record of PATH and store it in the ledger: "
                                               "valid facts as pending, duplicates and rejected records marked. "
                                               "Re-ingesting the same file adds nothing.")
    parser.add_argument("path", type=Path, metavar="PATH",
                        help="a .json, .jsonl or .csv file, or a folder saved by datasets' save_to_disk")
    parser.add_argument("--source", metavar="NAME", help="name recorded with every fact (default: the file name)")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from db.engine import make_engine
    from db.ingest import ingest_file
    from db.migrate import require_current

    engine = make_engine(args.db)
    try:
        require_current(engine)
        summary = ingest_file(engine, args.path, source=args.source)
    finally:
        engine.dispose()
    print(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) if args.json else summary.render())
    return 0
