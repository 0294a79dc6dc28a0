"""Argument types and help texts shared by the subcommands."""

from __future__ import annotations

import argparse
import json

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
