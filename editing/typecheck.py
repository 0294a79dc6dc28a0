"""Settings checked against their declared types, naming the key: one rule for every settings dataclass.

Hyperparameters, run settings and evaluation sizes arrive as YAML, JSON and
``--set KEY=VALUE`` strings. A dataclass takes whatever it is given, so a
mistyped ``values.steps=abc`` would travel into the run and fail minutes later
as a ``TypeError`` deep in the optimiser. :func:`checked_fields` refuses unknown
keys and values of the wrong type at once, with the key's full name
(``values.steps: expected an integer, got 'abc'``). Integers are accepted where
a float is declared (YAML writes ``2000`` for ``2000.0``), booleans are not
numbers, and a list is accepted for a tuple (JSON and YAML have no tuples).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
          list: "a list", tuple: "a list"}


def checked_fields(kind: type, values: Mapping[str, Any], section: str = "") -> dict[str, Any]:
    """``values`` for the dataclass ``kind``, after refusing unknown keys and mistyped values.

    ``section`` is the prefix of the keys in messages (``values`` → ``values.steps``). Fields whose type
    is itself a dataclass or is not a plain type (``Any``, callables) are left to the class itself.
    """
    hints = typing.get_type_hints(kind)
    known = {field.name for field in dataclasses.fields(kind)}
    unknown = set(values) - known
    prefix = f"{section}." if section else ""
    if unknown:
        listed = ", ".join(prefix + name + (f".{next(iter(values[name]))}" if isinstance(values[name], Mapping)
                                            and len(values[name]) == 1 else "") for name in sorted(unknown))
        raise ValueError(f"unknown setting(s) {listed}; known: {', '.join(prefix + name for name in sorted(known))}")
    for name, value in values.items():
        problem = _mismatch(hints[name], value)
        if problem is not None:
            raise ValueError(f"{prefix}{name}: expected {problem}, got {value!r}")
    return dict(values)


def _mismatch(annotation: Any, value: Any) -> str | None:
    """None if ``value`` fits ``annotation`` (or the annotation is not checked here), else what was expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        problems = [_mismatch(option, value) for option in options]
        if any(problem is None for problem in problems):
            return None
        return " or ".join(dict.fromkeys(problem for problem in problems if problem))
    if annotation is type(None):
        return None if value is None else "null"
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return _NAMES[origin]
        arguments = [argument for argument in typing.get_args(annotation) if argument is not Ellipsis]
        if arguments:
            for item in value:
                problem = _mismatch(arguments[0], item)
                if problem is not None:
                    return f"a list of {problem.removeprefix('an ').removeprefix('a ')}s"
        return None
    if origin is dict:
        return None if isinstance(value, Mapping) else _NAMES[dict]
    if annotation is bool:
        return None if isinstance(value, bool) else _NAMES[bool]
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else _NAMES[int]
    if annotation is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else _NAMES[float]
    if annotation is str:
        return None if isinstance(value, str) else _NAMES[str]
    return None
