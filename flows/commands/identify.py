"""``seqedit identify DIR``: which run and batch of this ledger a model folder is, from its weights alone.

Hashes the edited matrices of any Hugging Face model folder (an export, someone's ``save_pretrained``) and
answers ``run N batch K``, ``the unedited model of run N``, or ``not from this ledger`` (exit 1) — without
reading the ``seqedit.json`` a folder may carry. It only reads the ledger.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("identify", help="which run and batch a model folder is, from its weights",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, metavar="DIR", help="a Hugging Face model folder (safetensors)")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from db.identify import identify_folder
    from flows.commands.common import open_ledger

    engine = open_ledger(args.db, read_only=True)
    result = identify_folder(engine, args.folder)
    print(json.dumps(result.to_dict()) if args.json else result.describe())
    return 0 if result.identified else 1
