"""Ingestion: records from a source → validated rows of ``facts``, in one transaction.

Every record ends up as exactly one row (or is recognised as already there):

* valid, and the first request for its change → ``pending`` (queued for editing);
* valid, but asking for a change an earlier fact already asks for (same
  :meth:`Fact.identity_key`: subject, prompt and new target) → ``duplicate``,
  pointing at that fact, never edited;
* invalid → ``rejected``, with the reason code, field and detail from
  :class:`FactValidationError`, its location and its raw bytes.

A new fact about a subject and relation (its ``relation_id``, else its prompt) that already has an *applied*
fact with another target is a correction: the older fact gets ``superseded_by`` the new one (it stays, and stays
applied in the runs that edited it, until a run edits the correction), so the audit shows both.

A record is identified by (source, position, sha256 of its bytes): ingesting
the same file again finds every record present and inserts nothing, while a
changed record at the same position is a new one. The whole ingest is one
transaction, so a failure part-way (an unreadable file, a crash, a concurrent
ingest claiming the same identity key) leaves the database as it was. Records
are processed in chunks so that memory and query sizes stay bounded however
large the source.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.engine import transaction
from db.errors import LedgerError
from db.models import FactRecord, FactStatus, fact_columns
from db.readers import SourceRecord, read_records
from editing.facts import Fact, FactValidationError, fact_from_record

CHUNK_SIZE = 1000
SOURCE_MAX_CHARS = FactRecord.__table__.c.source.type.length
MAX_DETAIL_CHARS = 1000
"""Rejection details quote the offending value; a megabyte prompt is not worth storing twice."""
MAX_EXAMPLES = 20
"""Rejections listed individually in a summary (all of them are in the ledger)."""


@dataclass(frozen=True)
class Rejection:
    location: str
    reason: str
    field: str
    detail: str


@dataclass
class IngestSummary:
    """What one ingest did. ``accepted`` counts valid records newly stored (``pending + duplicates``)."""

    source: str
    records: int = 0
    accepted: int = 0
    pending: int = 0
    duplicates: int = 0
    unchanged: int = 0
    """Records found already ingested from this source (re-ingestion)."""
    superseded: list[tuple[int, int]] = field(default_factory=list)
    """(older applied fact, the new fact that corrects it) for every supersession this ingest recorded."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Rejected records newly stored, by reason code."""
    examples: list[Rejection] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "records": self.records, "accepted": self.accepted,
            "pending": self.pending, "duplicates": self.duplicates, "unchanged": self.unchanged,
            "rejected": self.rejected_total, "rejected_by_reason": dict(sorted(self.rejected.items())),
            "rejection_examples": [vars(example) for example in self.examples],
            "superseded": [{"fact_id": old, "superseded_by": new} for old, new in self.superseded],
            "seconds": round(self.seconds, 3),
        }

    def render(self) -> str:
        lines = [f"ingested {self.records} records from {self.source!r} in {self.seconds:.1f} s",
                 f"  accepted   {self.accepted:>7}  (pending {self.pending}, duplicates {self.duplicates})",
                 f"  rejected   {self.rejected_total:>7}"]
        lines += [f"    {reason:<24} {count:>7}" for reason, count in sorted(self.rejected.items())]
        lines.append(f"  unchanged  {self.unchanged:>7}  (already ingested)")
        if self.superseded:
            lines.append(f"  supersede  {len(self.superseded):>7}  applied facts, now corrected: "
                         + ", ".join(f"{old} → {new}" for old, new in self.superseded[:MAX_EXAMPLES]))
        if self.examples:
            lines.append("  first rejections:")
            lines += [f"    {example.location}: {example.reason} ({example.field}): {example.detail}"
                      for example in self.examples]
        return "\n".join(lines)


def ingest_file(engine: Engine, path: str | Path, source: str | None = None) -> IngestSummary:
    """Ingest the file or dataset folder at ``path``; ``source`` defaults to its file name."""
    path = Path(path)
    return ingest_records(engine, read_records(path), source or path.name)


def ingest_records(engine: Engine, records: Iterable[SourceRecord], source: str) -> IngestSummary:
    """Validate and store ``records`` of ``source`` in one transaction (see the module docstring)."""
    if not source or len(source) > SOURCE_MAX_CHARS:
        raise ValueError(f"a source name must have 1 to {SOURCE_MAX_CHARS} characters, got {len(source)}")
    started = time.perf_counter()
    summary = IngestSummary(source=source)
    canonical: dict[str, int] = {}
    try:
        with transaction(engine, write=True) as session:
            for chunk in _chunks(records, CHUNK_SIZE):
                _store_chunk(session, source, chunk, canonical, summary)
    except IntegrityError as error:  # PostgreSQL only: SQLite's write lock serialises ingests
        raise LedgerError(f"ingest of {source!r} collided with a concurrent ingest of the same facts and "
                          f"stored nothing; run it again") from error
    summary.seconds = time.perf_counter() - started
    return summary


def _chunks(records: Iterable[SourceRecord], size: int) -> Iterator[list[SourceRecord]]:
    iterator = iter(records)
    while chunk := list(islice(iterator, size)):
        yield chunk


@dataclass(frozen=True)
class _Checked:
    record: SourceRecord
    sha256: str
    fact: Fact | None = None
    key: str | None = None
    problem: FactValidationError | None = None


def _check(record: SourceRecord) -> _Checked:
    sha256 = hashlib.sha256(record.raw).hexdigest()
    if record.error is not None:
        return _Checked(record, sha256, problem=record.error)
    try:
        fact = fact_from_record(record.data, where=record.location)
    except FactValidationError as problem:
        return _Checked(record, sha256, problem=problem)
    return _Checked(record, sha256, fact=fact, key=fact.identity_key())


def _store_chunk(session: Session, source: str, chunk: list[SourceRecord], canonical: dict[str, int],
                 summary: IngestSummary) -> None:
    """Store one chunk; ``canonical`` maps identity keys to the id of the fact owning them."""
    summary.records += len(chunk)
    # A range of indices (an index scan) finds the chunk's earlier copies: readers number records
    # consecutively, and an IN list of a thousand indices made PostgreSQL scan the whole table.
    indices = [record.index for record in chunk]
    present = set(session.execute(
        select(FactRecord.source_index, FactRecord.record_sha256)
        .where(FactRecord.source == source, FactRecord.source_index.between(min(indices), max(indices)))
    ).tuples().all())
    checked = [_check(record) for record in chunk]
    new = [item for item in checked if (item.record.index, item.sha256) not in present]
    summary.unchanged += len(checked) - len(new)

    valid = [item for item in new if item.fact is not None]
    unknown = {item.key for item in valid} - canonical.keys()
    if unknown:
        canonical.update(session.execute(
            select(FactRecord.identity_key, FactRecord.id)
            .where(FactRecord.identity_key.in_(unknown), FactRecord.duplicate_of.is_(None))
        ).tuples().all())
    firsts: dict[str, _Checked] = {}
    duplicates: list[_Checked] = []
    for item in valid:
        if item.key in canonical or item.key in firsts:
            duplicates.append(item)
        else:
            firsts[item.key] = item
    if firsts:
        inserted = session.execute(
            insert(FactRecord).returning(FactRecord.identity_key, FactRecord.id, sort_by_parameter_order=True),
            [_valid_row(source, item, FactStatus.PENDING) for item in firsts.values()],
        ).tuples().all()
        canonical.update(inserted)
        summary.superseded += _supersede(session, [(canonical[key], item.fact) for key, item in firsts.items()])
    if duplicates:
        session.execute(insert(FactRecord), [
            {**_valid_row(source, item, FactStatus.DUPLICATE), "duplicate_of": canonical[item.key]}
            for item in duplicates])
    rejected = [item for item in new if item.problem is not None]
    if rejected:
        session.execute(insert(FactRecord), [_rejected_row(source, item) for item in rejected])

    summary.pending += len(firsts)
    summary.duplicates += len(duplicates)
    summary.accepted += len(firsts) + len(duplicates)
    for item in rejected:
        summary.rejected[item.problem.reason] += 1
        if len(summary.examples) < MAX_EXAMPLES:
            summary.examples.append(Rejection(item.record.location, item.problem.reason, item.problem.field,
                                              _clip(item.problem.detail)))


def _supersede(session: Session, new: list[tuple[int, Fact]]) -> list[tuple[int, int]]:
    """Mark the applied facts that the ``new`` (id, fact) pairs correct (see the module docstring)."""
    by_subject: dict[str, list[tuple[int, Fact]]] = {}
    for fact_id, fact in new:
        by_subject.setdefault(fact.subject, []).append((fact_id, fact))
    older = session.execute(
        select(FactRecord.id, FactRecord.subject, FactRecord.relation_id, FactRecord.prompt, FactRecord.target_new)
        .where(FactRecord.subject.in_(list(by_subject)), FactRecord.status == FactStatus.APPLIED,
               FactRecord.superseded_by.is_(None))
        .order_by(FactRecord.id)).all()
    marked = []
    for old_id, subject, relation, prompt, target in older:
        for new_id, fact in by_subject[subject]:
            same_relation = relation == fact.relation_id if fact.relation_id else (relation is None and
                                                                                     prompt == fact.prompt)
            if new_id > old_id and same_relation and target != fact.target_new:
                marked.append((old_id, new_id))
                break
    for old_id, new_id in marked:
        session.execute(update(FactRecord).where(FactRecord.id == old_id).values(superseded_by=new_id))
    return marked


def _source_columns(source: str, item: _Checked) -> dict[str, Any]:
    return {"source": source, "source_index": item.record.index, "location": item.record.location,
            "record_sha256": item.sha256}


def _valid_row(source: str, item: _Checked, status: FactStatus) -> dict[str, Any]:
    return {**_source_columns(source, item), **fact_columns(item.fact), "status": status}


def _rejected_row(source: str, item: _Checked) -> dict[str, Any]:
    problem = item.problem
    return {**_source_columns(source, item), "status": FactStatus.REJECTED, "rejection_reason": problem.reason,
            "rejection_field": problem.field, "rejection_detail": _clip(problem.detail), "raw": item.record.raw}


def _clip(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else f"{text[:MAX_DETAIL_CHARS]}… ({len(text)} characters)"
