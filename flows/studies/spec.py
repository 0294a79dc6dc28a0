"""A study as data: ``studies/*.yaml`` expanded into arms.

A spec names its facts, the settings every arm shares, a *grid* (the cross
product of the listed values) and/or explicit *arms*; each arm is one objective ×
edit distribution × layers × batch size × mode × overrides × seed::

    name: unified-batch-scaling
    facts: {file: counterfact-1000, start: 32, stop: 999}   # a catalog name or a path; records [start, stop)
    mode: independent          # or sequential (a run: fact pool, evaluation cadence, collapse policy)
    n_facts: 256               # facts per arm (independent: scored; sequential: the run's limit)
    seed: 0
    settings: {evaluation_profile: quick}          # any RunSettings field
    grid: {algorithm: [memit, emmet], layers: [[7], [3, 4, 5, 6, 7]], batch_size: [1, 16, 256]}
    arms: [{name: rome-L7, algorithm: rome, layers: [7], batch_size: 1}]

Precedence, later wins: the spec's top level → its ``settings`` → the grid point → the arm's entry →
the command line (``--n-facts``, ``--batch-sizes``, ``--facts``). An arm's ``layers`` become the edit
overrides ``layers`` and ``distribution`` (``single_layer`` for one layer,
:func:`editing.config.layer_overrides`); its ``overrides`` are dotted edit overrides
(``values.steps: 10``). Arm names are derived from what varies unless given.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from db.models import STUDY_MODES
from editing.config import flatten, layer_overrides
from flows.settings import RunSettings

ARM_KEYS = ("name", "mode", "n_facts", "seed", "algorithm", "distribution", "layers", "batch_size", "overrides")
"""Keys of a grid or an arm entry besides RunSettings fields."""
TOP_KEYS = ("name", "description", "facts", "mode", "n_facts", "seed", "settings", "grid", "arms", "deployment")


@dataclass(frozen=True)
class FactsSpec:
    """The records a study edits: ``file`` (a catalog dataset name or a path) records ``[start, stop)``."""

    file: str
    start: int = 0
    stop: int | None = None

    def source_name(self) -> str:
        """The ledger source the slice is ingested under (one per file and slice)."""
        stem = Path(self.file).name.removesuffix(".json").removesuffix(".jsonl")
        return f"{stem}[{self.start}:{'' if self.stop is None else self.stop}]"


@dataclass(frozen=True)
class ArmSpec:
    name: str
    mode: str
    n_facts: int
    seed: int
    settings: dict[str, Any]
    """A :class:`RunSettings` dict, checked."""

    def run_settings(self) -> RunSettings:
        return RunSettings.from_dict(self.settings)

    def to_row(self) -> dict[str, Any]:
        """What the ledger keeps as the arm's ``settings``."""
        return {**self.settings, "n_facts": self.n_facts, "seed": self.seed}


@dataclass(frozen=True)
class StudySpec:
    name: str
    facts: FactsSpec
    arms: tuple[ArmSpec, ...]
    deployment: str | None = None
    """The ``study-arm`` deployment arms are submitted to (None: run in this process)."""
    raw: dict[str, Any] = field(default_factory=dict)


def load_spec(path: str | Path, facts: str | None = None, n_facts: int | None = None,
              batch_sizes: Sequence[int] | None = None, name: str | None = None) -> StudySpec:
    """Read and expand ``path`` with the command line's overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such study spec (the shipped ones are in studies/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a study spec is a mapping (name, facts, grid/arms …)")
    if facts is not None:
        data["facts"] = {"file": facts}
    if n_facts is not None:
        data["n_facts"] = n_facts
    if name is not None:
        data["name"] = name
    try:
        return expand(data, batch_sizes)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from None


def expand(data: Mapping[str, Any], batch_sizes: Sequence[int] | None = None) -> StudySpec:
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} (a spec has {', '.join(TOP_KEYS)})")
    if not data.get("name"):
        raise ValueError("name: a study needs a name (or --name)")
    facts = _facts(data.get("facts"))
    grid = data.get("grid") or {}
    entries = data.get("arms") or []
    if not isinstance(grid, dict) or not isinstance(entries, list):
        raise ValueError("grid is a mapping of lists and arms a list of mappings")
    if not grid and not entries:
        raise ValueError("a study needs a grid or arms")
    if batch_sizes and grid:  # the command line's batch sizes replace the grid's axis
        grid = {**{key: values for key, values in grid.items() if key != "batch_size"},
                "batch_size": list(batch_sizes)}
    points = [dict(zip(grid, values)) for values in itertools.product(*(_axis(grid, key) for key in grid))] \
        if grid else []
    explicit = [dict(entry) for entry in entries]
    if batch_sizes:  # and each explicit arm is run at each of them
        explicit = [{**point, "batch_size": size, **({"name": f"{point['name']}-B{size}"} if point.get("name") else {})}
                    for point in explicit for size in batch_sizes]
    points += explicit
    base = {key: data[key] for key in ("mode", "n_facts", "seed") if key in data}
    shared = data.get("settings") or {}
    if not isinstance(shared, dict):
        raise ValueError("settings: expected a mapping of run settings")
    merged = [{**base, **point} for point in points]
    varying = {key for key in set().union(*merged) if len({repr(values.get(key)) for values in merged}) > 1}
    arms = [_arm(str(data["name"]), facts, base, shared, point, varying, index) for index, point in enumerate(points)]
    names = [arm.name for arm in arms]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"arm names repeat: {', '.join(repeated)} (name them, or vary something)")
    return StudySpec(name=str(data["name"]), facts=facts, arms=tuple(arms), deployment=data.get("deployment"),
                     raw={**dict(data), "batch_sizes": list(batch_sizes) if batch_sizes else None})


def _facts(value: Any) -> FactsSpec:
    if isinstance(value, str):
        return FactsSpec(value)
    if not isinstance(value, dict) or "file" not in value:
        raise ValueError("facts: expected {file: NAME_OR_PATH, start: N, stop: N}")
    unknown = sorted(set(value) - {"file", "start", "stop"})
    if unknown:
        raise ValueError(f"facts: unknown key(s) {', '.join(unknown)}")
    spec = FactsSpec(str(value["file"]), int(value.get("start", 0)),
                     None if value.get("stop") is None else int(value["stop"]))
    if spec.start < 0 or (spec.stop is not None and spec.stop <= spec.start):
        raise ValueError(f"facts: expected 0 <= start < stop, got {spec.start}..{spec.stop}")
    return spec


def _axis(grid: Mapping[str, Any], key: str) -> list[Any]:
    values = grid[key]
    if not isinstance(values, list) or not values:
        raise ValueError(f"grid.{key}: expected a non-empty list of values")
    return values


def _arm(study: str, facts: FactsSpec, base: Mapping[str, Any], shared: Mapping[str, Any], point: Mapping[str, Any],
         varying: set[str], index: int) -> ArmSpec:
    values = {**base, **point}
    mode = values.get("mode", "independent")
    if mode not in STUDY_MODES:
        raise ValueError(f"arm {index}: mode must be one of {', '.join(STUDY_MODES)}, got {mode!r}")
    n_facts = int(values.get("n_facts", 0))
    if n_facts < 1:
        raise ValueError(f"arm {index}: n_facts must be at least 1 (facts per arm), got {values.get('n_facts')!r}")
    seed = int(values.get("seed", 0))
    settings: dict[str, Any] = dict(shared)
    edit = flatten(settings.get("edit_overrides", {}))
    for key, value in point.items():
        if key in ("name", "mode", "n_facts", "seed", "layers", "distribution", "overrides"):
            continue
        settings[key] = value
    if "layers" in values:
        edit.update(layer_overrides(tuple(values["layers"]), values.get("distribution")))
    elif "distribution" in values:
        edit["distribution"] = values["distribution"]
    overrides = values.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"arm {index}: overrides is a mapping of edit settings (values.steps: 10)")
    edit.update(flatten(overrides))
    settings["edit_overrides"] = edit
    settings["fact_source"] = facts.source_name()
    if mode == "sequential":
        settings.setdefault("fact_pool", "private")
        settings["limit"] = n_facts
    name = str(point.get("name") or _derived_name(values, varying))
    settings["name"] = f"{study}/{name}"  # the run of a sequential arm is found by it
    try:
        run_settings = RunSettings.from_dict(settings)
        run_settings.edit_config()
    except (ValueError, TypeError) as error:
        raise ValueError(f"arm {name}: {error}") from None
    return ArmSpec(name=name, mode=mode, n_facts=n_facts, seed=seed, settings=run_settings.to_dict())


def _derived_name(values: Mapping[str, Any], varying: set[str]) -> str:
    parts = [str(values.get("algorithm", "emmet"))]
    if "layers" in values:
        layers = list(values["layers"])
        contiguous = len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1))
        parts.append(f"L{layers[0]}-{layers[-1]}" if contiguous else "L" + ".".join(map(str, layers)))
    if "batch_size" in values:
        parts.append(f"B{values['batch_size']}")
    if "mode" in varying:
        parts.append(str(values.get("mode", "independent")))
    if "seed" in varying:
        parts.append(f"seed{values.get('seed', 0)}")
    for key in sorted(varying - {"algorithm", "layers", "batch_size", "mode", "seed", "name", "distribution", "n_facts"}):
        if key == "overrides":
            parts += [f"{name.rsplit('.', 1)[-1]}{value}" for name, value in flatten(values.get(key) or {}).items()]
        elif key in values:
            parts.append(f"{key}{values[key]}")
    return "-".join(parts)
