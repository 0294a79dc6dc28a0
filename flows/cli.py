"""The ``seqedit`` command line.

Each subcommand lives in its own module under :mod:`flows.commands` and exposes
``register(subparsers)``; heavy imports (torch, transformers, Prefect) happen
inside the handlers so that ``seqedit --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType

COMMANDS = ("demo", "data", "init", "ingest", "run", "serve", "deploy_evaluator", "eval", "history", "rollback", "export",
            "export_model", "report", "edit", "study", "trace", "verify", "identify", "retract")
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


GLOBAL_HELP = {"verbose": "log progress at INFO level and show the traceback of an error",
               "data_dir": "the data mirror folder (default: $SEQEDIT_DATA, else ../shared/data beside the project; "
                           "datasets missing there come from the bundle or the hub)"}


def _add_global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """``-v`` and ``--data-dir``, accepted before and after the subcommand (below it they default to
    SUPPRESS, so an option given before the subcommand is not reset by the subcommand's parser)."""
    default = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="store_true", help=GLOBAL_HELP["verbose"], **default)
    parser.add_argument("--data-dir", metavar="DIR", help=GLOBAL_HELP["data_dir"], **default)


def _subparsers_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subparsers_of(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqedit",
        description="Sequential knowledge editing of language models with an SQL ledger.",
    )
    _add_global_options(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"flows.commands.{name}").register(subparsers)
    for child in _subparsers_of(parser):
        _add_global_options(child, top=False)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix (a bad option, a missing file or dataset, an unreachable or
    read-only ledger): printed as one line, their traceback only with ``-v``."""
    from sqlalchemy.exc import ArgumentError, DatabaseError

    from db.errors import LedgerError

    return (ValueError, LookupError, OSError, LedgerError, DatabaseError, ArgumentError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    if not args.verbose:
        # Prefect logs a failed flow's traceback (through its console handler, or through ours when it
        # propagates); the one-line error below says what went wrong, -v shows the rest.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        handler.addFilter(lambda record: not record.name.startswith("prefect"))
    # seqedit's loggers are at INFO for the Prefect UI's Logs tab (flows.prefect_ui); the terminal shows
    # warnings, or everything with -v
    handler.setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.data_dir:
        os.environ["SEQEDIT_DATA"] = str(Path(args.data_dir).resolve())
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        status = int(args.handler(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that left (`| head`) fails this flush, not the exit
        return status
    except Terminated as stop:
        print(f"seqedit {args.command}: {stop}; {_how_to_continue(args.command)}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"seqedit {args.command}: interrupted; {_how_to_continue(args.command)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `seqedit history | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except expected_errors() as error:
        if args.verbose:
            traceback.print_exc()
        print(f"seqedit {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


def _how_to_continue(command: str) -> str:
    if command == "study":
        return "a study continues where it stopped with the same `seqedit study run SPEC`"
    return "a run resumes with `seqedit run --resume RUN_ID`"


def one_line(error: BaseException) -> str:
    """The error's message on one line: a database driver's first line, never a traceback."""
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    driver = isinstance(error, SQLAlchemyError)
    if isinstance(error, DBAPIError) and error.orig is not None:
        error = error.orig
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    # seqedit's own messages say what happened; a database driver's needs its kind to make sense
    return f"{type(error).__name__}: {text}" if driver and ":" not in text else text


if __name__ == "__main__":
    sys.exit(main())
