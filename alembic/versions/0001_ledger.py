"""The ledger: facts, runs, batches, weight deltas, checkpoints, evaluations, metrics, alarms, rollbacks.

Revision ID: 0001
Revises:
Create Date: 2025-11-25

Written for SQLite and PostgreSQL alike: statuses are VARCHAR with CHECK
constraints, tensors are BLOB/bytea, and the per-run history rules are partial
unique indexes (see db/models.py for what each rule protects). The value lists
are spelled out here, not imported, so that this revision stays what it was
when later revisions change the models.
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FACT_STATUSES = ("pending", "claimed", "applied", "rolled_back", "rejected", "duplicate")
RUN_STATUSES = ("created", "running", "completed", "stopped", "failed")
BATCH_STATUSES = ("in_progress", "applied", "failed", "rolled_back")
EVALUATION_STATUSES = ("active", "rolled_back")


def _status_check(table: str, enum_name: str, values: Sequence[str]) -> sa.CheckConstraint:
    listed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"status IN ({listed})", name=op.f(f"ck_{table}_{enum_name}"))


def _partial(condition: str) -> dict[str, sa.TextClause]:
    return {"sqlite_where": sa.text(condition), "postgresql_where": sa.text(condition)}


def _timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _fk(column: str, table: str, target: str, nullable: bool = False) -> sa.Column:
    return sa.Column(column, sa.Integer(),
                     sa.ForeignKey(f"{target}.id", name=op.f(f"fk_{table}_{column}_{target}")),
                     nullable=nullable)


def _pk(table: str, *columns: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint(*columns, name=op.f(f"pk_{table}"))


def upgrade() -> None:
    op.create_table(
        "facts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("source_index", sa.Integer(), nullable=False),
        sa.Column("location", sa.String(200), nullable=False),
        sa.Column("record_sha256", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("identity_key", sa.String(64), nullable=True),
        _fk("duplicate_of", "facts", "facts", nullable=True),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("target_new", sa.Text(), nullable=True),
        sa.Column("target_true", sa.Text(), nullable=True),
        sa.Column("relation_id", sa.Text(), nullable=True),
        sa.Column("case_id", sa.Text(), nullable=True),
        sa.Column("paraphrase_prompts", sa.JSON(), nullable=True),
        sa.Column("neighborhood_prompts", sa.JSON(), nullable=True),
        sa.Column("generation_prompts", sa.JSON(), nullable=True),
        sa.Column("rejection_reason", sa.String(64), nullable=True),
        sa.Column("rejection_field", sa.String(200), nullable=True),
        sa.Column("rejection_detail", sa.Text(), nullable=True),
        sa.Column("raw", sa.LargeBinary(), nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        _pk("facts", "id"),
        sa.UniqueConstraint("source", "source_index", "record_sha256",
                            name=op.f("uq_facts_source_source_index_record_sha256")),
        _status_check("facts", "fact_status", FACT_STATUSES),
        sa.CheckConstraint("status <> 'rejected' OR rejection_reason IS NOT NULL",
                           name=op.f("ck_facts_rejected_has_reason")),
        sa.CheckConstraint("status = 'rejected' OR identity_key IS NOT NULL",
                           name=op.f("ck_facts_accepted_has_identity")),
        sa.CheckConstraint("(status = 'duplicate') = (duplicate_of IS NOT NULL)",
                           name=op.f("ck_facts_duplicate_has_original")),
    )
    op.create_index("uq_facts_identity_key", "facts", ["identity_key"], unique=True,
                    **_partial("identity_key IS NOT NULL AND duplicate_of IS NULL"))
    op.create_index("ix_facts_status_id", "facts", ["status", "id"])
    op.create_index("ix_facts_subject", "facts", ["subject"], postgresql_using="hash")

    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("model_name", sa.String(500), nullable=False),
        sa.Column("model_revision", sa.String(200), nullable=True),
        sa.Column("model_fingerprint", sa.String(128), nullable=True),
        sa.Column("algorithm", sa.String(64), nullable=False),
        sa.Column("distribution", sa.String(64), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("eval_every", sa.Integer(), nullable=False),
        sa.Column("checkpoint_every", sa.Integer(), nullable=False),
        sa.Column("collapse_policy", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        _pk("runs", "id"),
        _status_check("runs", "run_status", RUN_STATUSES),
        sa.CheckConstraint("batch_size > 0", name=op.f("ck_runs_positive_batch_size")),
        sa.CheckConstraint("eval_every >= 0", name=op.f("ck_runs_eval_every_not_negative")),
        sa.CheckConstraint("checkpoint_every > 0", name=op.f("ck_runs_positive_checkpoint_every")),
    )

    op.create_table(
        "rollbacks",
        sa.Column("id", sa.Integer(), nullable=False),
        _fk("run_id", "rollbacks", "runs"),
        sa.Column("to_seq", sa.Integer(), nullable=False),
        sa.Column("restore_facts", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        _timestamp("created_at"),
        _pk("rollbacks", "id"),
    )

    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), nullable=False),
        _fk("run_id", "batches", "runs"),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("n_facts", sa.Integer(), nullable=False),
        _timestamp("claimed_at"),
        _timestamp("finished_at", nullable=True),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _fk("rollback_id", "batches", "rollbacks", nullable=True),
        _pk("batches", "id"),
        _status_check("batches", "batch_status", BATCH_STATUSES),
        sa.CheckConstraint("seq >= 1", name=op.f("ck_batches_positive_seq")),
    )
    op.create_index("uq_batches_active_seq", "batches", ["run_id", "seq"], unique=True,
                    **_partial("status IN ('in_progress', 'applied')"))
    op.create_index("uq_batches_in_progress", "batches", ["run_id"], unique=True,
                    **_partial("status = 'in_progress'"))
    op.create_index("ix_batches_run_id_seq", "batches", ["run_id", "seq"])

    op.create_table(
        "batch_facts",
        _fk("batch_id", "batch_facts", "batches"),
        sa.Column("position", sa.Integer(), nullable=False),
        _fk("fact_id", "batch_facts", "facts"),
        _pk("batch_facts", "batch_id", "position"),
        sa.UniqueConstraint("batch_id", "fact_id", name=op.f("uq_batch_facts_batch_id_fact_id")),
    )
    op.create_index("ix_batch_facts_fact_id", "batch_facts", ["fact_id"])

    op.create_table(
        "weight_deltas",
        sa.Column("id", sa.Integer(), nullable=False),
        _fk("batch_id", "weight_deltas", "batches"),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("factors", sa.LargeBinary(), nullable=False),
        sa.Column("sha256_after", sa.String(64), nullable=False),
        _pk("weight_deltas", "id"),
        sa.UniqueConstraint("batch_id", "layer", name=op.f("uq_weight_deltas_batch_id_layer")),
    )

    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), nullable=False),
        _fk("run_id", "checkpoints", "runs"),
        _fk("batch_id", "checkpoints", "batches", nullable=True),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("weights", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        _timestamp("created_at"),
        _pk("checkpoints", "id"),
        sa.UniqueConstraint("batch_id", "layer", name=op.f("uq_checkpoints_batch_id_layer")),
    )
    op.create_index("uq_checkpoints_origin_layer", "checkpoints", ["run_id", "layer"], unique=True,
                    **_partial("batch_id IS NULL"))

    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        _fk("run_id", "evaluations", "runs"),
        _fk("batch_id", "evaluations", "batches", nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        _fk("rollback_id", "evaluations", "rollbacks", nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        _timestamp("created_at"),
        _pk("evaluations", "id"),
        _status_check("evaluations", "evaluation_status", EVALUATION_STATUSES),
    )
    op.create_index("ix_evaluations_run_id", "evaluations", ["run_id"])

    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        _fk("evaluation_id", "metrics", "evaluations"),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("split", sa.String(100), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        _pk("metrics", "id"),
        sa.UniqueConstraint("evaluation_id", "name", "split", name=op.f("uq_metrics_evaluation_id_name_split")),
    )

    op.create_table(
        "alarms",
        sa.Column("id", sa.Integer(), nullable=False),
        _fk("run_id", "alarms", "runs"),
        _fk("batch_id", "alarms", "batches", nullable=True),
        _fk("evaluation_id", "alarms", "evaluations", nullable=True),
        sa.Column("rule", sa.String(200), nullable=False),
        sa.Column("metric", sa.String(200), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("baseline", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        _timestamp("created_at"),
        _pk("alarms", "id"),
    )
    op.create_index("ix_alarms_run_id", "alarms", ["run_id"])


def downgrade() -> None:
    for table in ("alarms", "metrics", "evaluations", "checkpoints", "weight_deltas", "batch_facts", "batches",
                  "rollbacks", "runs", "facts"):
        op.drop_table(table)
