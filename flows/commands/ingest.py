"""``seqedit ingest PATH|DATASET [--source NAME] [--db URL] [--json]``: validate and store facts.

PATH is a file or folder of fact records (see :mod:`db.readers`); DATASET a fact dataset of
``seqedit data list`` (``counterfact``, ``counterfact-1000``, ``zsre`` …), read from wherever it resolves.
Each record needs a ``subject``, a ``prompt`` that contains the subject (or a ``{}`` placeholder for it),
``target_new`` (the answer to write) and ``target_true`` (the answer it replaces) — in CounterFact's full
schema under ``requested_rewrite``, in EasyEdit's reduced one as ``prompt``/``target_new``/``ground_truth``;
paraphrase, neighbourhood and generation prompts are optional. Rejected records are kept in the ledger with
their reason and field; the summary counts each. Re-ingesting the same file adds nothing. The exit status
is 1 when the source held records and none of them was valid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ingest", help="load facts from a file, folder or named dataset into the ledger",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", metavar="PATH|DATASET",
                        help="a .json, .jsonl or .csv file, a folder saved by datasets' save_to_disk, or the name "
                             "of a fact dataset (seqedit data list)")
    parser.add_argument("--source", metavar="NAME",
                        help="name recorded with every fact (default: the file or dataset name)")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=_handle)


def fact_source_path(text: str) -> tuple[Path, str]:
    """The file to read for PATH|DATASET and the default source name: an existing path wins over a
    dataset of the same name."""
    from editing.data import catalog, resolve

    path = Path(text)
    if path.exists() or text not in catalog():
        return path, path.name
    spec = catalog()[text]
    if spec.kind != "facts":
        raise ValueError(f"dataset {text!r} holds {spec.kind} records, not facts")
    return resolve(text).path, text


def _handle(args: argparse.Namespace) -> int:
    from db.ingest import ingest_file
    from flows.commands.common import open_ledger

    path, default_source = fact_source_path(args.path)
    engine = open_ledger(args.db)
    try:
        summary = ingest_file(engine, path, source=args.source or default_source)
    finally:
        engine.dispose()
    print(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) if args.json else summary.render())
    return 1 if summary.records and not (summary.accepted or summary.unchanged) else 0
