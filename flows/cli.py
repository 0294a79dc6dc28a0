"""The ``seqedit`` command line.

Each subcommand lives in its own module under :mod:`flows.commands` and exposes
``register(subparsers)``; heavy imports (torch, transformers, Prefect) happen
inside the handlers so that ``seqedit --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from types import FrameType

COMMANDS = ("demo", "init", "ingest", "run", "serve", "deploy_evaluator", "eval", "history", "rollback", "export",
            "export_model", "report", "edit")
"""Subcommand modules in :mod:`flows.commands`, in the order ``--help`` lists them."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler, a container stop) as an exception instead of an immediate exit.

    The default action ends the process on the spot: no ``finally``, no ``atexit`` — and the temporary
    Prefect API server a flow started (a child process) keeps running. Raised instead, the signal
    unwinds like Ctrl-C: Prefect marks the flow run crashed (and then re-delivers the signal to this
    handler), the run is marked failed in the ledger (its claimed batch resumes with ``--resume``), and
    the interpreter's exit stops the server. A ``KeyboardInterrupt`` so that ``except Exception``
    blocks in libraries let it through, as they do Ctrl-C.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(signum)


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

    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, LookupError, FileNotFoundError, LedgerError) as error:
        print(f"seqedit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Terminated as stop:
        print(f"seqedit {args.command}: {stop}; a run resumes with `seqedit run --resume RUN_ID`", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"seqedit {args.command}: interrupted; a run resumes with `seqedit run --resume RUN_ID`",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
