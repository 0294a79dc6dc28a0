"""``seqedit init [--db URL]``: create or migrate the ledger's tables (Alembic ``upgrade head``)."""

from __future__ import annotations

import argparse

from flows.commands.common import DB_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("init", help="create or migrate the ledger database",
                                   description="Create the ledger's tables, or migrate them to this version.")
    parser.add_argument("--db", metavar="URL", help=DB_HELP)
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from db.engine import database_url, display_url
    from db.migrate import head_revision, upgrade

    upgrade(args.db)
    print(f"ledger {display_url(database_url(args.db))} is at revision {head_revision()}")
    return 0
