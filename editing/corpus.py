"""Text corpora: for the preserved-key statistics ``C0`` and for held-out perplexity.

Both must read *the same* texts every time (statistics are cached by what they
were computed from; perplexity is compared across the points of a run), so
:func:`open_corpus` draws a sample that depends only on the corpus's texts, the
sample size and the seed, and fingerprints the sample itself: the same texts give
the same fingerprint (and the same cached ``C0``) whether they were read from the
mirror, the bundle or the hub. It also accepts the user's own text: a ``.txt``
file (one text per non-empty line), a ``.jsonl``/``.json`` file (field ``text``,
``extract`` or ``Text``), a ``datasets`` dataset saved with ``save_to_disk``, or
a ``datasets`` hub name.

Named corpora (datasets of :mod:`editing.data`, resolved mirror → bundle → hub):

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
import random
import re
from dataclasses import dataclass
from pathlib import Path

from editing.data import Sample, mirror_dir, resolve

MIN_PARAGRAPH_CHARS = 200
"""WikiText lines shorter than this are captions, list items or fragments, not prose."""

_HEADING = re.compile(r"^=+ .* =+$")

TEXT_FIELDS = ("text", "extract", "Text")
"""Fields tried, in order, for the text of a JSON record or dataset row."""


def data_dir(override: str | Path | None = None) -> Path:
    """The mirror folder (see :func:`editing.data.mirror_dir`)."""
    return mirror_dir(override)


@dataclass(frozen=True)
class TextReader:
    """How a named corpus's file is read into texts: WikiText paragraphs, or one field of JSON records
    (``jsonl``: one per line; ``json``: a list)."""

    layout: str
    field: str | None = None

    def read(self, path: Path) -> list[str]:
        if self.layout == "wikitext":
            lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
            return [line for line in lines if len(line) >= MIN_PARAGRAPH_CHARS and not _HEADING.match(line)]
        if self.layout == "jsonl":
            with path.open(encoding="utf-8") as handle:
                records = [json.loads(line) for line in handle if line.strip()]
        else:
            records = json.loads(path.read_text(encoding="utf-8"))
        return [text.strip() for record in records if (text := record.get(self.field) or "").strip()]


TEXT_CORPORA: dict[str, TextReader] = {
    "wikitext-2-test": TextReader("wikitext"),
    "wikitext-2-valid": TextReader("wikitext"),
    "wikipedia-leads": TextReader("jsonl", "extract"),
    "me-ppl-50": TextReader("json", "Text"),
    "me-ppl-1k": TextReader("json", "Text"),
}


def sample_texts(texts: list[str], n: int | None, seed: int) -> list[str]:
    """``n`` texts drawn without replacement by a generator seeded with ``seed`` (all of them if ``n`` is None
    or at least their number), in corpus order so the sample reads like the corpus."""
    if n is None or n >= len(texts):
        return list(texts)
    return [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), n))]


@dataclass(frozen=True)
class OpenedCorpus:
    """A corpus's sampled texts, a fingerprint of exactly those texts, and where they were read from."""

    name: str
    texts: list[str]
    fingerprint: str
    origin: str


def load_texts(corpus: str, n: int | None = None, seed: int = 0, root: str | Path | None = None) -> list[str]:
    """A fixed, seeded sample of ``n`` texts of a named corpus (see :data:`TEXT_CORPORA`)."""
    if corpus not in TEXT_CORPORA:
        raise ValueError(f"unknown text corpus {corpus!r}; known: {sorted(TEXT_CORPORA)}")
    return open_corpus(corpus, n, seed, root).texts


def open_corpus(spec: str, n: int | None = None, seed: int = 0, root: str | Path | None = None) -> OpenedCorpus:
    """The seeded sample of ``n`` texts (None: all) of a named corpus, a file, a saved dataset folder or a
    ``datasets`` hub name."""
    if spec in TEXT_CORPORA:
        resolved = resolve(spec, None if n is None else Sample(n, seed), root)
        name, texts, origin = spec, TEXT_CORPORA[spec].read(resolved.path), resolved.origin
    else:
        name, texts, origin = _user_texts(spec)
    sampled = sample_texts(texts, n, seed)
    if not sampled:
        raise ValueError(f"corpus {name!r} holds no texts")
    return OpenedCorpus(name, sampled, _texts_digest(sampled), origin)


def _user_texts(spec: str) -> tuple[str, list[str], str]:
    path = Path(spec)
    if path.is_dir():
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[next(iter(dataset))]
        return path.name, [text for row in dataset if (text := _text_of(row).strip())], "folder"
    if path.is_file():
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                records = [json.loads(line) for line in handle if line.strip()]
        elif path.suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
        else:
            records = [{"text": line} for line in path.read_text(encoding="utf-8").splitlines()]
        return path.name, [text for record in records if (text := _text_of(record).strip())], "file"
    try:
        import datasets

        dataset = datasets.load_dataset(spec, split="train")
    except Exception as error:  # the hub is unreachable offline; say what was tried
        first = (str(error).strip().splitlines() or [""])[0][:160]
        raise FileNotFoundError(f"corpus {spec!r} is not a known name ({', '.join(sorted(TEXT_CORPORA))}), a "
                                f"file, a saved dataset folder, or a loadable datasets name "
                                f"({type(error).__name__}: {first})") from error
    return spec, [text for row in dataset if (text := _text_of(row).strip())], "hub"


def _text_of(record: dict) -> str:
    for field in TEXT_FIELDS:
        if isinstance(record.get(field), str):
            return record[field]
    raise ValueError(f"record has none of the text fields {TEXT_FIELDS}: keys {sorted(record)[:8]}")


def _texts_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x1e")
    return digest.hexdigest()
