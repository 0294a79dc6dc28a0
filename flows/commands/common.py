"""Argument types and help texts shared by the subcommands."""

from __future__ import annotations

import argparse
import json

ALGORITHMS = ("rome", "memit", "emmet", "alphaedit", "encore", "rlsedit", "lyaplock", "nas", "rect", "prune",
              "alphaedit-published", "encore-published")
"""The algorithms of ``editing.objectives.ALGORITHMS`` (objectives and the methods built on one), spelled out so that ``--help`` does not import torch
(a test checks the two agree)."""

DB_HELP = "database URL (default: $SEQEDIT_DATABASE_URL, else sqlite:///seqedit.db in the working directory)"


def parse_layers(text: str) -> tuple[int, ...]:
    """``4,5,6`` → (4, 5, 6)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers are comma-separated integers, got {text!r}") from None


def parse_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a JSON value (numbers, lists, booleans) or a bare word."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. values.steps=10), got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:  # a bare word such as a corpus name
        return key.strip(), value


def add_runtime_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--device``, ``--dtype``, ``--threads`` (see :class:`editing.runtime.Runtime`)."""
    group = parser.add_argument_group("runtime (how, not what)")
    group.add_argument("--device", help="cuda, cuda:1 or cpu (default: CUDA when available)")
    group.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                       help="model weights (default auto: bfloat16 on CUDA, float32 on the CPU)")
    group.add_argument("--solve-dtype", choices=("float64", "float32"), help="the layers' solves (default float64)")
    group.add_argument("--threads", type=int, help="CPU threads (default: the CPUs this process may use)")
    group.add_argument("--device-map", type=_device_map, help="place the model across devices with accelerate: "
                       "auto, balanced, sequential, or JSON like '{\"model.layers.0\": 0, \"lm_head\": \"cpu\"}'")
    return group


def runtime_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The runtime fields given on the command line."""
    given = {"device": args.device, "dtype": args.dtype, "solve_dtype": args.solve_dtype, "threads": args.threads,
             "device_map": args.device_map}
    return {name: value for name, value in given.items() if value is not None}


def _device_map(text: str) -> str | dict[str, str | int]:
    """A strategy name (``auto``) or a JSON object module → device."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--device-map is a strategy name or a JSON object: {error}") from None


def open_ledger(url: str | None, read_only: bool = False):
    """The ledger's engine, connected once and checked to be at the current schema: every command starts
    here, so that a bad URL, an unreachable server or an old schema is one line before anything else runs.
    ``read_only`` commands never create an SQLite file and can read a ledger they may not write; the others are
    refused at once, in one line, when the ledger's role may not write (an auditor's SELECT-only role)."""
    from db.engine import make_engine
    from db.migrate import require_current

    engine = make_engine(url, read_only=read_only, check=True)
    require_current(engine)
    if not read_only:
        from db.engine import require_writable

        require_writable(engine)
    return engine


def check_writer_free(engine, run_id: int) -> None:
    """Refuse at once (:class:`db.errors.RunLockedError`) when another process writes run ``run_id``: the
    check a command makes before it starts Prefect and loads a model (the flow takes the lock for real)."""
    from db.ledger import acquire_writer

    with acquire_writer(engine, run_id):
        pass


def check_datasets(settings, edit=None) -> None:
    """Resolve every dataset a run with ``settings`` (and edit configuration ``edit``) reads
    (:meth:`flows.settings.RunSettings.required_datasets`) before anything starts: a missing one is one line
    (:class:`editing.data.DataUnavailable`) instead of a failure minutes into the run, and a hub copy is
    downloaded once, here."""
    from editing.data import resolve

    for name, sample in settings.required_datasets(edit):
        resolve(name, sample)


def check_run_datasets(run) -> None:
    """:func:`check_datasets` for a recorded run (``db.runs.RunInfo``), with the configuration it recorded."""
    from editing.config import EditConfig
    from flows.settings import RunSettings

    stored = run.spec.hyperparameters
    if "settings" in stored and "edit" in stored:
        check_datasets(RunSettings.recorded(stored["settings"]), EditConfig.from_dict(stored["edit"]))
