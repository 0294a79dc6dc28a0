"""Where a named dataset is read from: the mirror, then the bundle, then the hub.

The order is the one a user's machine needs (``docs/data.md``):

1. **the mirror** — ``<file>`` under the data folder: ``--data-dir`` / ``$SEQEDIT_DATA``, else
   ``../shared/data`` beside the project (how the makers' machines and CI hold every dataset);
2. **the bundle** — package data, when it holds what is asked for (all of the dataset, or the one
   seeded sample it bundles);
3. **the hub** — the pinned Hugging Face copy, converted to the file form: from the cache if it was
   downloaded before, else downloaded now (once).

When none of them has it, :class:`DataUnavailable` says so in one line naming the dataset and each place
it looked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from editing.data.bundle import unpacked
from editing.data.catalog import DatasetSpec, Sample, dataset_spec
from editing.data.hub import fetch, hub_cache_path

DATA_ENV = "SEQEDIT_DATA"
DEFAULT_MIRROR = Path(__file__).resolve().parents[3] / "shared" / "data"
"""The shared data folder beside the project root, where the makers' machines keep their mirror."""

ORIGINS = ("mirror", "bundle", "hub")


class DataUnavailable(FileNotFoundError):
    """No place has the dataset; the message is one line naming each place looked at."""


@dataclass(frozen=True)
class Resolved:
    """A dataset's file form on disk and where it came from."""

    spec: DatasetSpec
    path: Path
    origin: str


def mirror_dir(override: str | Path | None = None) -> Path:
    """The mirror folder: ``override``, else ``$SEQEDIT_DATA``, else :data:`DEFAULT_MIRROR`."""
    return Path(override or os.environ.get(DATA_ENV) or DEFAULT_MIRROR)


def resolve(name: str, sample: Sample | None = None, root: str | Path | None = None,
            download: bool = True) -> Resolved:
    """The file of dataset ``name`` that serves ``sample`` (None: the whole dataset).

    ``root`` overrides the mirror folder; ``download=False`` uses a hub copy only if it is cached.
    """
    spec = dataset_spec(name)
    tried = []
    mirrored = mirror_dir(root) / spec.file
    if mirrored.is_file():
        return Resolved(spec, mirrored, "mirror")
    tried.append(f"mirror {mirrored} (missing)")
    if spec.bundle is not None and spec.bundle.serves(sample):
        return Resolved(spec, unpacked(spec), "bundle")
    tried.append("bundle (not bundled)" if spec.bundle is None else
                 f"bundle (holds the {spec.bundle.describe()} only, asked for "
                 f"{'all records' if sample is None else f'n={sample.n} seed={sample.seed}'})")
    if spec.hub is None:
        tried.append("hub (no copy known)")
    else:
        cached = hub_cache_path(spec)
        if cached.is_file():
            return Resolved(spec, cached, "hub")
        if download:
            try:
                return Resolved(spec, fetch(spec), "hub")
            except Exception as error:  # offline, unreachable, or refused: say which, in one line
                tried.append(f"hub {spec.hub.describe()} ({_one_line(error)})")
        else:
            tried.append(f"hub {spec.hub.describe()} (not downloaded)")
    raise DataUnavailable(f"dataset {name!r} not available (mirror, bundle, hub): {'; '.join(tried)}. "
                          f"Point --data-dir or ${DATA_ENV} at a folder holding {spec.file}, or run "
                          f"`seqedit data fetch {name}` where the hub is reachable")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:160]}"
