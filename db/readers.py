"""Read a source of fact records into a stream of :class:`SourceRecord`, one per record.

Supported sources, chosen by :data:`READERS` (suffix → reader) or by being a
folder:

* ``.json`` — a JSON array of records (CounterFact's full schema, EasyEdit's
  reduced one, or flat objects);
* ``.jsonl`` / ``.ndjson`` — one JSON object per line;
* ``.csv`` — a header with ``subject, prompt, target_new, target_true`` and
  optionally ``relation_id, case_id`` and prompt-list columns
  (:data:`LIST_COLUMNS`, each cell a JSON array or a single prompt);
* a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a
  ``DatasetDict``, whose splits are read in name order).

Parsing is done by libraries (``json``, pandas, ``datasets``). What this
module adds is that one broken record cannot take the file down with it: files
are decoded with ``surrogateescape`` (and a leading byte-order mark is
ignored), so an invalid UTF-8 byte becomes a lone
surrogate that :func:`editing.facts.fact_from_record` rejects for that record
only, and a JSON line that does not parse becomes a record carrying its error.
(pandas' JSON reader is not used for ``.json``: it refuses a whole file over one
invalid byte.) Every record keeps its position, a human-readable location and
its raw bytes, which the ledger stores for rejected records and hashes to make
re-ingestion idempotent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from editing.facts import FactValidationError

LIST_COLUMNS = ("paraphrase_prompts", "paraphrases", "neighborhood_prompts", "neighbourhood_prompts",
                "generation_prompts")
"""CSV columns holding a list of prompts: a JSON array, a single prompt, or empty for none."""

RECORD_FIELD = "<record>"
"""Field name reported when a whole record could not be parsed."""


@dataclass(frozen=True)
class SourceRecord:
    """One record as read, before validation."""

    index: int
    """0-based position among the source's records."""
    location: str
    """Where a person finds it: ``line 12`` (JSONL), ``record 5`` (JSON), ``row 3`` (CSV), ``train[7]``."""
    raw: bytes
    """The record's bytes: the line itself for JSONL, canonical JSON of the parsed record otherwise."""
    data: Any = None
    error: FactValidationError | None = None
    """Set when the record could not be parsed; ``data`` is then None."""


def read_records(path: str | Path) -> Iterator[SourceRecord]:
    """The records of the file or dataset folder at ``path``, in source order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        return _read_dataset(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        known = ", ".join(sorted(READERS))
        raise ValueError(f"cannot tell the format of {path}: expected a file ending in {known}, "
                         f"or a folder saved by datasets' save_to_disk")
    return reader(path)


def _canonical_bytes(record: Any) -> bytes:
    """Deterministic bytes of a parsed record (sorted keys), restoring undecodable bytes."""
    text = json.dumps(record, ensure_ascii=False, sort_keys=True, default=str)
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate written as a \ud8xx escape in the source
        return text.encode("utf-8", "backslashreplace")


def _read_json_array(path: Path) -> Iterator[SourceRecord]:
    text = path.read_bytes().decode("utf-8-sig", "surrogateescape")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        hint = "; a file with one JSON object per line should be named .jsonl" if error.msg == "Extra data" else ""
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, "
                         f"column {error.colno}){hint}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a JSON {type(records).__name__}, expected an array of records")
    for index, record in enumerate(records):
        yield SourceRecord(index, f"record {index}", _canonical_bytes(record), record)


def _read_json_lines(path: Path) -> Iterator[SourceRecord]:
    index = 0
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            location = f"line {number}"
            try:
                data = json.loads(raw.decode("utf-8-sig", "surrogateescape"))
            except json.JSONDecodeError as error:
                problem = FactValidationError(location, RECORD_FIELD, "malformed_json",
                                              f"not valid JSON: {error.msg} at column {error.colno}")
                yield SourceRecord(index, location, raw, error=problem)
            else:
                yield SourceRecord(index, location, raw, data)
            index += 1


def _read_csv(path: Path) -> Iterator[SourceRecord]:
    # Every cell as the text it is: no NaN for "NA"/"null" (real subjects), no number parsing.
    frame = pd.read_csv(path, dtype=object, keep_default_na=False, encoding_errors="surrogateescape")
    for index, row in enumerate(frame.to_dict(orient="records")):
        location = f"row {index + 1}"
        raw = _canonical_bytes(row)
        try:
            record = {column: _csv_cell(column, value, location) for column, value in row.items()}
        except FactValidationError as problem:
            yield SourceRecord(index, location, raw, error=problem)
        else:
            yield SourceRecord(index, location, raw, record)


def _csv_cell(column: str, value: str, location: str) -> Any:
    if column not in LIST_COLUMNS:
        return value
    if not value.strip():
        return None
    if not value.lstrip().startswith("["):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise FactValidationError(location, column, "malformed_json",
                                  f"looks like a JSON array but is not valid JSON: {error.msg}") from None


def _read_dataset(path: Path) -> Iterator[SourceRecord]:
    import datasets  # heavy; only needed for this source

    loaded = datasets.load_from_disk(str(path))
    splits = sorted(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    index = 0
    for split, dataset in splits:
        for position, row in enumerate(dataset):
            location = f"{split}[{position}]" if split is not None else f"row {position}"
            yield SourceRecord(index, location, _canonical_bytes(row), row)
            index += 1


READERS: dict[str, Callable[[Path], Iterator[SourceRecord]]] = {
    ".json": _read_json_array,
    ".jsonl": _read_json_lines,
    ".ndjson": _read_json_lines,
    ".csv": _read_csv,
}
