"""Datasets from the Hugging Face hub: downloaded once, converted to their file form, kept in the cache.

A hub copy lands in ``$SEQEDIT_CACHE/data/hub/<file>`` beside a record of where it
came from (``<file>.source.json``: repository, revision, config, split, sha256,
records, time), which ``seqedit data verify`` checks it against later. Writing is
atomic, so an interrupted download leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from editing.data.catalog import DatasetSpec, HubSource
from editing.data.convert import CONVERTERS, Rows
from editing.models.loading import cache_dir


def hub_cache_path(spec: DatasetSpec) -> Path:
    """Where the converted hub copy of ``spec`` lives."""
    return cache_dir() / "data" / "hub" / spec.file


def provenance_path(path: Path) -> Path:
    return path.with_name(path.name + ".source.json")


def read_provenance(path: Path) -> dict[str, Any] | None:
    record = provenance_path(path)
    return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None


def hub_rows(source: HubSource) -> Iterator[Mapping[str, Any]]:
    """The rows of a ``datasets`` hub source, split after split (needs the network or the hub's cache)."""
    import datasets

    for split in source.split:
        streamed = source.streamed_rows is not None
        dataset = datasets.load_dataset(source.repo, source.config, split=split, revision=source.revision,
                                        streaming=streamed)
        yield from itertools.islice(dataset, source.streamed_rows) if streamed else dataset


def download_file(source: HubSource) -> Path:
    """A raw file of a hub dataset repository (``source.file``), through ``huggingface_hub``'s cache."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source.repo, source.file, repo_type="dataset", revision=source.revision))


def fetch(spec: DatasetSpec) -> Path:
    """Download ``spec``'s hub copy, convert it, and keep it in the cache; returns its path."""
    if spec.hub is None:
        raise LookupError(f"dataset {spec.name!r} has no hub copy")
    if spec.hub.file is not None:
        return store(spec, download_file(spec.hub).read_bytes())
    return store(spec, CONVERTERS[spec.hub.convert](hub_rows(spec.hub)))


def materialise(spec: DatasetSpec, rows: Rows) -> Path:
    """Convert ``rows`` (in the hub's schema) to ``spec``'s file form and keep it as its hub copy.

    What :func:`fetch` does after downloading; tests call it with rows of a dataset saved locally.
    """
    return store(spec, CONVERTERS[spec.hub.convert](rows))


def store(spec: DatasetSpec, content: bytes) -> Path:
    """Write ``content`` as the hub copy of ``spec`` with its provenance record, atomically."""
    path = hub_cache_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = spec.hub
    provenance = {"dataset": spec.name, "repo": source.repo, "revision": source.revision, "config": source.config,
                  "split": list(source.split), "file": source.file, "streamed_rows": source.streamed_rows,
                  "sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content),
                  "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_atomically(path, content)
    _write_atomically(provenance_path(path), json.dumps(provenance, indent=2).encode())
    return path


def _write_atomically(path: Path, content: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(content)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
