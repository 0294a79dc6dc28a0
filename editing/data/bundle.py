"""The datasets shipped inside the package, so that the demo runs with nothing beside the repository.

The bundle holds what ``seqedit demo`` reads offline (see ``bundled/README.md``):
complete copies of small files, and of the C0 text only the seeded sample the
statistics draw. Files are stored gzipped and unpacked on first use into
``$SEQEDIT_CACHE/data/bundle/<digest>/<file>``, keyed by the packed file's digest
so that a new release never reads a stale copy.

``python -m editing.data.bundle MIRROR`` rebuilds the bundle from a mirror folder
(how the shipped files were made).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

from editing.data.catalog import DatasetSpec, catalog
from editing.data.hub import _write_atomically
from editing.models.loading import cache_dir

BUNDLE_DIR = Path(__file__).with_name("bundled")


def packed_path(spec: DatasetSpec) -> Path:
    """The gzipped file of ``spec`` in the package."""
    return BUNDLE_DIR / f"{spec.file}.gz"


def unpacked(spec: DatasetSpec) -> Path:
    """The bundled file of ``spec``, unpacked into the cache on first use."""
    packed = packed_path(spec)
    if not packed.is_file():
        raise FileNotFoundError(f"the package's bundle lacks {packed.name} (a broken installation?)")
    digest = hashlib.sha256(packed.read_bytes()).hexdigest()[:16]
    target = cache_dir() / "data" / "bundle" / digest / spec.file
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, gzip.decompress(packed.read_bytes()))
    return target


def sampled_lines(spec: DatasetSpec, content: bytes) -> bytes:
    """The JSON lines of a text corpus whose texts the bundle's seeded sample draws, in corpus order.

    The sample is drawn exactly as the statistics draw it (:func:`editing.corpus.sample_texts` over the
    non-empty texts), so a corpus read from these lines and sampled again yields the same texts in the
    same order: the bundle's C0 is the mirror's C0.
    """
    from editing.corpus import TEXT_CORPORA, sample_texts

    field = TEXT_CORPORA[spec.name].field
    lines = [line for line in content.decode("utf-8").splitlines() if line.strip()]
    with_text = [line for line in lines if (json.loads(line).get(field) or "").strip()]
    chosen = sample_texts(with_text, spec.bundle.sample.n, spec.bundle.sample.seed)
    return ("\n".join(chosen) + "\n").encode()


def build_bundle(mirror: Path) -> list[Path]:
    """Write the bundle's files from the mirror folder ``mirror``; returns the files written."""
    written = []
    for spec in catalog().values():
        if spec.bundle is None:
            continue
        content = (mirror / spec.file).read_bytes()
        if spec.bundle.sample is not None:
            content = sampled_lines(spec, content)
        target = packed_path(spec)
        target.parent.mkdir(parents=True, exist_ok=True)
        # mtime=0: the same content packs to the same bytes, so a rebuild changes no file it need not.
        target.write_bytes(gzip.compress(content, compresslevel=9, mtime=0))
        written.append(target)
    return written


if __name__ == "__main__":
    for path in build_bundle(Path(sys.argv[1])):
        print(f"{path.stat().st_size:>9,d}  {path}")
