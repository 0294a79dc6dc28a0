"""The ``seqedit`` command line.

Each subcommand lives in its own module under :mod:`flows.commands` and exposes
``register(subparsers)``; heavy imports (torch, transformers, Prefect) happen
inside the handlers so that ``seqedit --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("demo", "init", "ingest", "run", "serve", "deploy_evaluator", "eval", "history", "rollback", "export",
            "export_model", "report", "edit")
"""Subcommand modules in :mod:`flows.commands`, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqedit",
        description="Sequential knowledge editing of language models with an SQL ledger.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"flows.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from db.errors import LedgerError

    try:
        return int(args.handler(args) or 0)
    except (ValueError, LookupError, FileNotFoundError, LedgerError) as error:
        print(f"seqedit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seqedit {args.command}: interrupted; a run resumes with `seqedit run --resume RUN_ID`",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
