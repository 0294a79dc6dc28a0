"""Text corpora: for the preserved-key statistics ``C0`` and for held-out perplexity.

Both must read *the same* texts every time (statistics are cached by corpus
fingerprint; perplexity is compared across the points of a run), so
:func:`load_texts` draws a sample that depends only on the corpus, its size and
the seed. :func:`open_corpus` also accepts the user's own text: a ``.txt`` file
(one text per non-empty line), a ``.jsonl``/``.json`` file (field ``text``,
``extract`` or ``Text``), a ``datasets`` dataset saved with ``save_to_disk``, or
a ``datasets`` hub name (where it is cached locally).

Named corpora (files under the shared data folder, see its README):

* ``wikitext-2-test``: WikiText-2 raw test split, one paragraph per line
  (CRLF), headings (`` = Title = ``) and short lines dropped;
* ``wikitext-2-valid``: the validation split, read the same way;
* ``wikipedia-leads``: lead summaries of Wikipedia vital articles (``extract``);
* ``me-ppl-50`` / ``me-ppl-1k``: ME-PPL (Yang et al. 2024), texts chosen so
  that their perplexity reveals edit-induced collapse (``Text``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The shared data folder beside the project root; ``SEQEDIT_DATA`` overrides it."""

MIN_PARAGRAPH_CHARS = 200
"""WikiText lines shorter than this are captions, list items or fragments, not prose."""

_HEADING = re.compile(r"^=+ .* =+$")


def data_dir(override: str | Path | None = None) -> Path:
    """The data folder: ``override``, else ``$SEQEDIT_DATA``, else :data:`DEFAULT_DATA_DIR`."""
    return Path(override or os.environ.get("SEQEDIT_DATA") or DEFAULT_DATA_DIR)


def wikitext_paragraphs(path: Path) -> list[str]:
    """Non-heading WikiText lines of at least :data:`MIN_PARAGRAPH_CHARS` characters, stripped."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if len(line) >= MIN_PARAGRAPH_CHARS and not _HEADING.match(line)]


def jsonl_field(field: str) -> Callable[[Path], list[str]]:
    """Loader of the non-empty ``field`` of every object of a JSON-lines file."""
    def load(path: Path) -> list[str]:
        with path.open(encoding="utf-8") as handle:
            records = (json.loads(line) for line in handle if line.strip())
            return [text.strip() for record in records if (text := record.get(field) or "").strip()]
    return load


def json_list_field(field: str) -> Callable[[Path], list[str]]:
    """Loader of the non-empty ``field`` of every object of a JSON list."""
    def load(path: Path) -> list[str]:
        records = json.loads(path.read_text(encoding="utf-8"))
        return [text.strip() for record in records if (text := record.get(field) or "").strip()]
    return load


@dataclass(frozen=True)
class TextCorpus:
    """Where a corpus lives under the data folder and how its texts are read."""

    file: str
    load: Callable[[Path], list[str]]


TEXT_CORPORA: dict[str, TextCorpus] = {
    "wikitext-2-test": TextCorpus("text/wikitext-2-raw-test.txt", wikitext_paragraphs),
    "wikitext-2-valid": TextCorpus("text/wikitext-2-raw-valid.txt", wikitext_paragraphs),
    "wikipedia-leads": TextCorpus("text/wikipedia-lead-summaries.jsonl", jsonl_field("extract")),
    "me-ppl-50": TextCorpus("collapse/me-ppl-50.json", json_list_field("Text")),
    "me-ppl-1k": TextCorpus("collapse/me-ppl-1k.json", json_list_field("Text")),
}


def sample_texts(texts: list[str], n: int | None, seed: int) -> list[str]:
    """``n`` texts drawn without replacement by a generator seeded with ``seed`` (all of them if ``n`` is None
    or at least their number), in corpus order so the sample reads like the corpus."""
    if n is None or n >= len(texts):
        return list(texts)
    return [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), n))]


def load_texts(corpus: str, n: int | None = None, seed: int = 0, root: str | Path | None = None) -> list[str]:
    """A fixed, seeded sample of ``n`` texts of a named corpus (see :data:`TEXT_CORPORA`)."""
    if corpus not in TEXT_CORPORA:
        raise ValueError(f"unknown text corpus {corpus!r}; known: {sorted(TEXT_CORPORA)}")
    spec = TEXT_CORPORA[corpus]
    path = data_dir(root) / spec.file
    if not path.is_file():
        raise FileNotFoundError(f"{corpus}: {path} does not exist (set SEQEDIT_DATA to the shared data folder)")
    return sample_texts(spec.load(path), n, seed)


TEXT_FIELDS = ("text", "extract", "Text")
"""Fields tried, in order, for the text of a JSON record or dataset row."""


@dataclass(frozen=True)
class OpenedCorpus:
    """All texts of a corpus and a fingerprint that changes whenever they do."""

    name: str
    texts: list[str]
    fingerprint: str


def _text_of(record: dict) -> str:
    for field in TEXT_FIELDS:
        if isinstance(record.get(field), str):
            return record[field]
    raise ValueError(f"record has none of the text fields {TEXT_FIELDS}: keys {sorted(record)[:8]}")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _texts_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x1e")
    return digest.hexdigest()


def open_corpus(spec: str, root: str | Path | None = None) -> OpenedCorpus:
    """Every text of a named corpus, a file, a saved dataset folder or a ``datasets`` hub name."""
    if spec in TEXT_CORPORA:
        path = data_dir(root) / TEXT_CORPORA[spec].file
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: {path} does not exist (set SEQEDIT_DATA to the shared data folder)")
        return OpenedCorpus(spec, TEXT_CORPORA[spec].load(path), _file_digest(path))
    path = Path(spec)
    if path.is_dir():
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[next(iter(dataset))]
        texts = [text for row in dataset if (text := _text_of(row).strip())]
        return OpenedCorpus(path.name, texts, _texts_digest(texts))
    if path.is_file():
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                records = [json.loads(line) for line in handle if line.strip()]
        elif path.suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
        else:
            records = [{"text": line} for line in path.read_text(encoding="utf-8").splitlines()]
        texts = [text for record in records if (text := _text_of(record).strip())]
        return OpenedCorpus(path.name, texts, _file_digest(path))
    try:
        import datasets

        dataset = datasets.load_dataset(spec, split="train")
    except Exception as error:  # the hub is unreachable offline; say what was tried
        known = sorted(TEXT_CORPORA)
        raise FileNotFoundError(f"corpus {spec!r} is not a known name {known}, a file, a saved dataset "
                                f"folder, or a loadable datasets name ({error})") from error
    texts = [text for row in dataset if (text := _text_of(row).strip())]
    return OpenedCorpus(spec, texts, dataset._fingerprint)
