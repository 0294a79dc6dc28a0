"""The dataset catalog: what seqedit reads, where each dataset is found, and how it is pinned.

The catalog is data (``catalog.yaml`` beside this module); this module only
gives it types. Each :class:`DatasetSpec` names the dataset's *file form* — the
path under a mirror folder and the layout its readers expect — and up to two
other places that can supply the same form: a :class:`BundleSpec` (package
data) and a :class:`HubSource` (the Hugging Face hub, converted on download).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

CATALOG_FILE = Path(__file__).with_name("catalog.yaml")
KINDS = ("text", "downstream", "facts")


@dataclass(frozen=True)
class Sample:
    """A seeded sample of ``n`` records (``editing.corpus.sample_texts``): what a sampled bundle holds."""

    n: int
    seed: int


@dataclass(frozen=True)
class BundleSpec:
    """What the package bundles of a dataset: all of it, or one sample (the only one it then serves)."""

    complete: bool = False
    sample: Sample | None = None
    sha256: str | None = None
    """sha256 of a sampled bundle's unpacked file (a complete bundle holds the mirror's bytes: ``DatasetSpec.sha256``)."""

    def serves(self, sample: Sample | None) -> bool:
        """Whether a request for ``sample`` (None: every record) can be answered from the bundle."""
        return self.complete or (sample is not None and sample == self.sample)

    def describe(self) -> str:
        return "complete" if self.complete else f"sample n={self.sample.n} seed={self.sample.seed}"


@dataclass(frozen=True)
class HubSource:
    """A pinned copy on the Hugging Face hub and the converter that writes it in the dataset's file form.

    Either a ``datasets`` dataset (``config``, ``split``; several splits are read in order) or one raw
    ``file`` of a dataset repository. ``streamed_rows`` reads only that many rows, streamed, so that a
    corpus sampled from a prefix of a large dump never downloads the dump.
    """

    repo: str
    revision: str
    convert: str
    config: str | None = None
    split: tuple[str, ...] = ()
    file: str | None = None
    streamed_rows: int | None = None
    differs: str | None = None
    """How the hub copy differs from the mirror's file (another selection of the same source), if it does."""

    def describe(self) -> str:
        where = self.file if self.file else "/".join(filter(None, (self.config, "+".join(self.split))))
        return f"{self.repo}@{self.revision} {where}"


@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset."""

    name: str
    kind: str
    file: str
    """Path of the file form, relative to a mirror folder (and to the bundle and the hub cache)."""
    licence: str
    source: str
    records: int | None = None
    sha256: str | None = None
    """sha256 of the mirror's file; a complete bundle holds the same bytes."""
    bundle: BundleSpec | None = None
    hub: HubSource | None = None

    @property
    def bundle_sha256(self) -> str | None:
        """The pinned sha256 of the bundled file, unpacked."""
        if self.bundle is None:
            return None
        return self.sha256 if self.bundle.complete else self.bundle.sha256


def _spec(name: str, entry: Mapping[str, Any]) -> DatasetSpec:
    values = dict(entry)
    if values.get("kind") not in KINDS:
        raise ValueError(f"{CATALOG_FILE}: dataset {name!r} has kind {values.get('kind')!r}; kinds: {KINDS}")
    if "bundle" in values:
        bundle = dict(values["bundle"])
        if "sample" in bundle:
            bundle["sample"] = Sample(**bundle["sample"])
        values["bundle"] = BundleSpec(**bundle)
    if "hub" in values:
        hub = dict(values["hub"])
        split = hub.get("split", ())
        hub["split"] = (split,) if isinstance(split, str) else tuple(split)
        values["hub"] = HubSource(**hub)
    return DatasetSpec(name=name, **values)


@lru_cache(maxsize=1)
def catalog() -> dict[str, DatasetSpec]:
    """Every dataset of ``catalog.yaml``, by name."""
    document = yaml.safe_load(CATALOG_FILE.read_text(encoding="utf-8"))
    return {name: _spec(name, entry) for name, entry in document["datasets"].items()}


def dataset_spec(name: str) -> DatasetSpec:
    """The catalog entry ``name``; a one-line error listing the known names otherwise."""
    specs = catalog()
    if name not in specs:
        raise LookupError(f"unknown dataset {name!r}; known: {', '.join(sorted(specs))}")
    return specs[name]
