"""What is on this machine of each dataset, and whether it is what the catalog pins.

``seqedit data list`` and ``seqedit data verify`` (:mod:`flows.commands.data`) print
these; nothing here downloads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from editing.data.bundle import packed_path, unpacked
from editing.data.catalog import DatasetSpec
from editing.data.hub import hub_cache_path, read_provenance
from editing.data.resolve import DataUnavailable, mirror_dir, resolve
from editing.models.loading import file_sha256


@dataclass(frozen=True)
class Availability:
    """Where a dataset resolves now (without downloading) and what that file holds."""

    spec: DatasetSpec
    origin: str | None
    """``mirror``, ``bundle`` or ``hub`` (a cached download); None when nothing local has it."""
    path: Path | None = None
    records: int | None = None
    size: int | None = None
    sha256: str | None = None
    scope: str = "all"
    """``all``, or the one sample a sampled bundle serves."""


@dataclass(frozen=True)
class Check:
    """One local copy of a dataset checked against its pinned sha256."""

    dataset: str
    origin: str
    path: Path
    expected: str | None
    actual: str

    @property
    def ok(self) -> bool | None:
        """True / False against a pinned hash; None when nothing is pinned for this copy."""
        return None if self.expected is None else self.expected == self.actual


def count_records(spec: DatasetSpec, path: Path) -> int:
    """Records as the dataset's reader sees them: texts of a corpus, entries of a JSON list or JSON lines."""
    if spec.kind == "text":
        from editing.corpus import TEXT_CORPORA

        return len(TEXT_CORPORA[spec.name].read(path))
    if path.suffix == ".jsonl":
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return len(json.loads(path.read_text(encoding="utf-8")))


def availability(spec: DatasetSpec, root: str | Path | None = None) -> Availability:
    """Where ``spec`` resolves now, for the whole dataset or, failing that, for the sample its bundle holds."""
    scope, resolved = "all", None
    try:
        resolved = resolve(spec.name, root=root, download=False)
    except DataUnavailable:
        if spec.bundle is not None and spec.bundle.sample is not None:
            resolved = resolve(spec.name, spec.bundle.sample, root=root, download=False)
            scope = spec.bundle.describe()
    if resolved is None:
        return Availability(spec, None)
    return Availability(spec, resolved.origin, resolved.path, count_records(spec, resolved.path),
                        resolved.path.stat().st_size, file_sha256(resolved.path), scope)


def local_copies(spec: DatasetSpec, root: str | Path | None = None) -> list[Check]:
    """Every copy of ``spec`` on this machine — mirror file, bundle, hub download — with its pinned hash."""
    checks = []
    mirrored = mirror_dir(root) / spec.file
    if mirrored.is_file():
        checks.append(Check(spec.name, "mirror", mirrored, spec.sha256, file_sha256(mirrored)))
    if spec.bundle is not None and packed_path(spec).is_file():
        path = unpacked(spec)
        checks.append(Check(spec.name, "bundle", path, spec.bundle_sha256, file_sha256(path)))
    cached = hub_cache_path(spec)
    if cached.is_file():
        recorded = read_provenance(cached) or {}
        checks.append(Check(spec.name, "hub", cached, recorded.get("sha256"), file_sha256(cached)))
    return checks
