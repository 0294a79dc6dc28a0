"""The ledger's tables as SQLAlchemy 2 models.

The schema is created only by the Alembic migrations in ``alembic/``; these
models describe it for queries, and a test checks that the two agree on SQLite
and PostgreSQL. Every construct is chosen to mean the same on both databases:
statuses are strings guarded by CHECK constraints (no native enums), tensors
are safetensors bytes in a BLOB/bytea, timestamps are UTC, and the rules that
keep a run's history consistent are *partial unique indexes* both databases
enforce:

* one active (``in_progress`` or ``applied``) batch per run and sequence
  number, so that after a rollback to ``n`` the run continues at ``n + 1``
  while the rolled-back rows stay;
* at most one ``in_progress`` batch per run (one writer);
* one canonical fact per identity key (duplicates point at it).

The history is append-only: nothing here is ever deleted; rollback and
failure change statuses.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (JSON, Boolean, CheckConstraint, DateTime, Dialect, Enum, Float, ForeignKey, Index, Integer,
                        LargeBinary, MetaData, String, Text, TypeDecorator, UniqueConstraint, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from editing.facts import Fact

FACT_FIELDS = tuple(field.name for field in dataclasses.fields(Fact))
"""The :class:`Fact` attributes stored one-to-one as columns of ``facts``."""


class FactStatus(StrEnum):
    PENDING = "pending"
    """Valid and waiting to be edited."""
    CLAIMED = "claimed"
    """Taken by an ``in_progress`` batch; stays attached to it until commit or failure."""
    APPLIED = "applied"
    ROLLED_BACK = "rolled_back"
    """Its batch was rolled back and it was not put back in the queue."""
    REJECTED = "rejected"
    """Failed validation at ingestion; ``rejection_*`` and ``raw`` say why and what."""
    DUPLICATE = "duplicate"
    """Asks for the same change as the fact ``duplicate_of``; never edited itself."""


class RunStatus(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"


class BatchStatus(StrEnum):
    IN_PROGRESS = "in_progress"
    APPLIED = "applied"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class EvaluationStatus(StrEnum):
    ACTIVE = "active"
    ROLLED_BACK = "rolled_back"


FACT_POOLS = ("shared", "private")
EVALUATION_KINDS = ("full", "health")

EDITABLE_FACT_STATUSES = (FactStatus.PENDING, FactStatus.CLAIMED, FactStatus.APPLIED, FactStatus.ROLLED_BACK)
"""Statuses of valid, canonical facts (not rejected, not duplicates): what a private pool draws from."""

ACTIVE_BATCH_STATUSES = (BatchStatus.IN_PROGRESS, BatchStatus.APPLIED)
"""Statuses of the batches that make up a run's current history."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases.

    PostgreSQL keeps the zone, SQLite drops it; storing UTC and re-attaching it
    when reading makes both return the same aware values.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the ledger stores aware UTC times")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _status(enum: type[StrEnum], name: str) -> Enum:
    """A status column: a short string with a CHECK constraint, identical on both databases."""
    return Enum(enum, name=name, native_enum=False, create_constraint=True, length=16,
                values_callable=lambda members: [member.value for member in members])


def _partial(condition: str) -> dict[str, Any]:
    """``WHERE`` clause of a partial index, for both dialects."""
    return {"sqlite_where": text(condition), "postgresql_where": text(condition)}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class LedgerIdentity(Base):
    """The ledger's one random id (migration 0008): what tells two ledgers apart where they share a Prefect
    server, whose artifact keys and tags would otherwise collide (``run-1-summary`` of each)."""

    __tablename__ = "ledger_identity"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ledger_id: Mapped[str] = mapped_column(String(36))


class FactRecord(Base):
    """One record of an ingested source: a valid fact, a duplicate, or a rejected record."""

    __tablename__ = "facts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(200))
    source_index: Mapped[int] = mapped_column(Integer)
    """0-based position of the record in its source."""
    location: Mapped[str] = mapped_column(String(200))
    """Where a person finds the record: ``line 12``, ``record 5``, ``row 3``, ``train[7]``."""
    record_sha256: Mapped[str] = mapped_column(String(64))
    """Hash of the record as read; with source and index, the key that makes re-ingestion idempotent."""
    status: Mapped[FactStatus] = mapped_column(_status(FactStatus, "fact_status"))
    identity_key: Mapped[str | None] = mapped_column(String(64))
    """:meth:`Fact.identity_key`; NULL for rejected records."""
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("facts.id"))
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("facts.id"))
    """A later fact about the same subject and relation with another target, ingested while this one was
    applied: the correction that replaces it (see :mod:`db.supersession`). Kept beside ``status``, not in it,
    because the fact stays applied in the runs that edited it until they edit its successor."""
    subject: Mapped[str | None] = mapped_column(Text)
    prompt: Mapped[str | None] = mapped_column(Text)
    target_new: Mapped[str | None] = mapped_column(Text)
    target_true: Mapped[str | None] = mapped_column(Text)
    relation_id: Mapped[str | None] = mapped_column(Text)
    case_id: Mapped[str | None] = mapped_column(Text)
    paraphrase_prompts: Mapped[list[str] | None] = mapped_column(JSON)
    neighborhood_prompts: Mapped[list[str] | None] = mapped_column(JSON)
    generation_prompts: Mapped[list[str] | None] = mapped_column(JSON)
    neighborhood_answer: Mapped[str | None] = mapped_column(Text)
    rejection_reason: Mapped[str | None] = mapped_column(String(64))
    rejection_field: Mapped[str | None] = mapped_column(String(200))
    rejection_detail: Mapped[str | None] = mapped_column(Text)
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The rejected record as read (bytes: it may not be valid UTF-8 or may contain NUL)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    __table_args__ = (
        UniqueConstraint("source", "source_index", "record_sha256"),
        Index("uq_facts_identity_key", "identity_key", unique=True,
              **_partial("identity_key IS NOT NULL AND duplicate_of IS NULL")),
        Index("ix_facts_status_id", "status", "id"),
        # A hash index: PostgreSQL's B-tree refuses keys over ~2.7 kB, and a valid
        # subject may be 2,048 four-byte characters.
        Index("ix_facts_subject", "subject", postgresql_using="hash"),
        CheckConstraint("status <> 'rejected' OR rejection_reason IS NOT NULL", name="rejected_has_reason"),
        CheckConstraint("status = 'rejected' OR identity_key IS NOT NULL", name="accepted_has_identity"),
        CheckConstraint("(status = 'duplicate') = (duplicate_of IS NOT NULL)", name="duplicate_has_original"),
    )

    def to_fact(self) -> Fact:
        """The validated :class:`Fact` this row stores (not for rejected rows)."""
        return Fact.from_dict({name: getattr(self, name) for name in FACT_FIELDS})


def fact_columns(fact: Fact) -> dict[str, Any]:
    """Column values of ``facts`` that store ``fact`` exactly (inverse of :meth:`FactRecord.to_fact`)."""
    return {**fact.to_dict(), "identity_key": fact.identity_key()}


class RunRecord(Base):
    """A sequential-editing run: what is edited, how, and where it stands."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    model_name: Mapped[str] = mapped_column(String(500))
    model_revision: Mapped[str | None] = mapped_column(String(200))
    model_fingerprint: Mapped[str | None] = mapped_column(String(128))
    algorithm: Mapped[str] = mapped_column(String(64))
    distribution: Mapped[str] = mapped_column(String(64))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    batch_size: Mapped[int] = mapped_column(Integer)
    eval_every: Mapped[int] = mapped_column(Integer)
    """Evaluate every this many batches (0: never)."""
    checkpoint_every: Mapped[int] = mapped_column(Integer)
    """Store full edited-layer weights every this many batches (bounds rollback time)."""
    collapse_policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    fact_pool: Mapped[str] = mapped_column(String(16), server_default="shared")
    """``shared``: the run takes pending facts and consumes them (each fact is edited once, by
    whichever run claims it); ``private``: the run edits every valid fact of its source, in id
    order, whatever other runs did, and leaves the facts' global status alone."""
    fact_source: Mapped[str | None] = mapped_column(String(200))
    """Only facts ingested under this source name (NULL: any source; required for ``private``)."""
    parent_run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    """A branch (``seqedit retract``): the run whose history it shares up to ``parent_seq``."""
    parent_seq: Mapped[int | None] = mapped_column(Integer)
    retracted_fact_id: Mapped[int | None] = mapped_column(ForeignKey("facts.id"))
    """The fact the branch leaves out of the parent's later batches."""
    branch_reason: Mapped[str | None] = mapped_column(Text)
    status: Mapped[RunStatus] = mapped_column(_status(RunStatus, "run_status"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    __table_args__ = (
        CheckConstraint("batch_size > 0", name="positive_batch_size"),
        CheckConstraint("eval_every >= 0", name="eval_every_not_negative"),
        CheckConstraint("checkpoint_every > 0", name="positive_checkpoint_every"),
        CheckConstraint("fact_pool IN ('shared', 'private')", name="known_fact_pool"),
        CheckConstraint("(parent_run_id IS NULL) = (parent_seq IS NULL)", name="branch_has_point"),
    )


class RollbackRecord(Base):
    """One rollback of a run to batch ``to_seq``: why the later batches are marked."""

    __tablename__ = "rollbacks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    to_seq: Mapped[int] = mapped_column(Integer)
    restore_facts: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BatchRecord(Base):
    """One batch of a run: the facts it took, when, and what became of it."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    seq: Mapped[int] = mapped_column(Integer)
    """1-based position in the run's history; reused by the batch that follows a rollback."""
    status: Mapped[BatchStatus] = mapped_column(_status(BatchStatus, "batch_status"))
    n_facts: Mapped[int] = mapped_column(Integer)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)
    """Seconds per phase, as measured by the flow."""
    diagnostics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """What the edit achieved: ``memorization`` (layer → share of its residual written), v* convergence."""
    error: Mapped[str | None] = mapped_column(Text)
    rollback_id: Mapped[int | None] = mapped_column(ForeignKey("rollbacks.id"))
    chain_record: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """What the batch did, as sealed at commit (:mod:`db.chain`): its facts' content, its deltas' and keys'
    sha256, the layers' hashes after it, the previous batch's chain hash (and, for batch 1, the run's
    configuration). NULL until the batch is committed."""
    chain_sha256: Mapped[str | None] = mapped_column(String(64))
    """sha256 of the canonical encoding of ``chain_record``: the head of the run's hash chain at this batch."""

    __table_args__ = (
        Index("uq_batches_active_seq", "run_id", "seq", unique=True,
              **_partial("status IN ('in_progress', 'applied')")),
        Index("uq_batches_in_progress", "run_id", unique=True, **_partial("status = 'in_progress'")),
        Index("ix_batches_run_id_seq", "run_id", "seq"),
        CheckConstraint("seq >= 1", name="positive_seq"),
    )


class BatchFact(Base):
    """Membership of a fact in a batch, in claim order; kept after failure or rollback."""

    __tablename__ = "batch_facts"

    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"), index=True)

    __table_args__ = (UniqueConstraint("batch_id", "fact_id"),)


class WeightDelta(Base):
    """A batch's update of one layer: factors ``U``, ``V`` and the layer's hash afterwards."""

    __tablename__ = "weight_deltas"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"))
    layer: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    factors: Mapped[bytes] = mapped_column(LargeBinary)
    """safetensors bytes holding ``u`` (d_out × r) and ``v`` (d_in × r)."""
    sha256_after: Mapped[str] = mapped_column(String(64))
    keys: Mapped[bytes | None] = mapped_column(LargeBinary)
    """safetensors bytes holding ``k``, the batch's keys at this layer (d_in × B, float32): the edit memory's share."""
    keys_sha256: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (UniqueConstraint("batch_id", "layer"),)


class Checkpoint(Base):
    """The full weights of one edited layer after a batch (``batch_id`` NULL: before any batch)."""

    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"))
    layer: Mapped[int] = mapped_column(Integer)
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    """safetensors bytes holding ``weight`` in canonical (d_out × d_in) orientation and original dtype."""
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("batch_id", "layer"),
        Index("uq_checkpoints_origin_layer", "run_id", "layer", unique=True, **_partial("batch_id IS NULL")),
    )


class EvaluationRecord(Base):
    """One evaluation of a run at a point of its history (``batch_id`` NULL: the baseline)."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"))
    status: Mapped[EvaluationStatus] = mapped_column(_status(EvaluationStatus, "evaluation_status"))
    rollback_id: Mapped[int | None] = mapped_column(ForeignKey("rollbacks.id"))
    duration_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16), server_default="full")
    """``full``: an evaluation point; ``health``: the cheap check after a batch (see ``EVALUATION_KINDS``)."""
    seal_record: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Its metrics as recorded, bound to the chain hash of the batch it evaluated (:mod:`db.chain`)."""
    seal_sha256: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (CheckConstraint(f"kind IN {EVALUATION_KINDS}", name="known_kind"),)


class MetricRecord(Base):
    """One metric value of an evaluation (long format); NULL stands for NaN."""

    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id"))
    name: Mapped[str] = mapped_column(String(200))
    split: Mapped[str] = mapped_column(String(100))
    value: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (UniqueConstraint("evaluation_id", "name", "split"),)


class AlarmRecord(Base):
    """A collapse alarm raised by the policy, with the numbers that raised it and the action taken."""

    __tablename__ = "alarms"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"))
    evaluation_id: Mapped[int | None] = mapped_column(ForeignKey("evaluations.id"))
    rule: Mapped[str] = mapped_column(String(200))
    metric: Mapped[str] = mapped_column(String(200))
    value: Mapped[float | None] = mapped_column(Float)
    baseline: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    action: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RequestStatus(StrEnum):
    PENDING = "pending"
    """Submitted (or due to be), not claimed by a worker yet — or claimed by one whose lease ran out."""
    RUNNING = "running"
    """Claimed by a worker, which renews ``lease_until`` while it evaluates."""
    DONE = "done"
    """The evaluation is recorded (``evaluation_id``), in the transaction that set this status."""
    FAILED = "failed"
    """The evaluation raised; the batch may be requested again."""


class EvaluationRequest(Base):
    """An evaluation point handed to another process (``eval_mode: async``), tracked until its metrics are in."""

    __tablename__ = "evaluation_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"))
    status: Mapped[RequestStatus] = mapped_column(_status(RequestStatus, "request_status"))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    """How many times a worker claimed it (more than one: a worker died or failed before finishing)."""
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    """The Prefect flow run last submitted for it."""
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    evaluation_id: Mapped[int | None] = mapped_column(ForeignKey("evaluations.id"))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    __table_args__ = (
        Index("uq_evaluation_requests_batch_id", "batch_id", unique=True, **_partial("status <> 'failed'")),
    )


class StudyStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


STUDY_MODES = ("independent", "sequential")


class StudyRecord(Base):
    """A named set of arms (``seqedit study run SPEC.yaml``): the spec as expanded, and where it stands."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The study's spec with the command line's overrides applied (what its arms were expanded from)."""
    fact_source: Mapped[str] = mapped_column(String(200))
    """The ledger source its facts were ingested under."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class StudyArmRecord(Base):
    """One arm of a study: its settings, its status and, for a sequential arm, its run."""

    __tablename__ = "study_arms"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(16))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The arm's :class:`flows.settings.RunSettings` (as a dict) plus ``n_facts`` and ``seed``."""
    status: Mapped[StudyStatus] = mapped_column(_status(StudyStatus, "arm_status"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    """A sequential arm's run (None until it is created; an independent arm has none)."""
    v_star_key: Mapped[str | None] = mapped_column(String(64))
    """sha256 of the v* ingredients other than the fact (model, layer, v* settings, prefixes)."""
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(200))
    """``host:pid:ppid`` of the process that last ran the arm (on a work pool the parent is the Prefect worker)."""
    error: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float | None] = mapped_column(Float)
    """Wall time the arm's flow runs spent, summed over resumes."""
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    __table_args__ = (UniqueConstraint("study_id", "name"),
                      CheckConstraint(f"mode IN {STUDY_MODES}", name="known_mode"))


class ArmBatchRecord(Base):
    """One batch of an independent arm: edited into the unedited model, scored on its facts, undone."""

    __tablename__ = "arm_batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    arm_id: Mapped[int] = mapped_column(ForeignKey("study_arms.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    n_facts: Mapped[int] = mapped_column(Integer)
    timings: Mapped[dict[str, float]] = mapped_column(JSON)
    diagnostics: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The edit's diagnostics (memorization per layer, v*) and how many v* were computed and reused."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("arm_id", "seq"), CheckConstraint("seq >= 1", name="positive_seq"))


class ArmFactScore(Base):
    """The scores of one fact right after its batch's edit, in an independent arm (NULL: not defined)."""

    __tablename__ = "arm_fact_scores"

    arm_batch_id: Mapped[int] = mapped_column(ForeignKey("arm_batches.id"), primary_key=True)
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"), primary_key=True)
    es: Mapped[float | None] = mapped_column(Float)
    ps: Mapped[float | None] = mapped_column(Float)
    ns: Mapped[float | None] = mapped_column(Float)
    em: Mapped[float | None] = mapped_column(Float)
    pm: Mapped[float | None] = mapped_column(Float)
    nm: Mapped[float | None] = mapped_column(Float)
    ge: Mapped[float | None] = mapped_column(Float)
    rewrite_acc: Mapped[float | None] = mapped_column(Float)
    """Token accuracies under teacher forcing (zsRE's efficacy, generalisation, specificity)."""
    rephrase_acc: Mapped[float | None] = mapped_column(Float)
    locality_acc: Mapped[float | None] = mapped_column(Float)
    wild_rewrite: Mapped[float | None] = mapped_column(Float)
    """Exact match of the greedy answer (no teacher forcing) on the rewrite and rephrase prompts."""
    wild_rephrase: Mapped[float | None] = mapped_column(Float)


class VStarEntry(Base):
    """A fact's v* target ``z``, kept under the hash of everything it depends on, for reuse across arms."""

    __tablename__ = "v_star_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    """sha256 of ``ingredients_key`` and the fact's identity."""
    ingredients_key: Mapped[str] = mapped_column(String(64), index=True)
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"))
    ingredients: Mapped[dict[str, Any]] = mapped_column(JSON)
    """What the key hashes (model fingerprint and dtype, layer, v* settings, prefixes), readable."""
    z: Mapped[bytes] = mapped_column(LargeBinary)
    """safetensors bytes holding ``z`` and ``delta`` (d,) float32."""
    final_nll: Mapped[float] = mapped_column(Float)
    initial_nll: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    stop_reason: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
