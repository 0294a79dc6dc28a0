"""Studies: named sets of arms, the per-fact scores of independent arms, and the v* cache.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

A study (``seqedit study run SPEC.yaml``) is a set of arms. A *sequential* arm is
a run (``runs``) like any other; an *independent* arm edits each of its batches
into the unedited model, scores the batch's facts and undoes the edit, so it has
no run: its batches and per-fact scores are kept here, committed one batch per
transaction so that an interrupted arm resumes at its first missing batch. The
v* cache keeps each fact's target ``z`` under the hash of everything it depends
on (model, layer, v* settings, prefixes, the fact), so arms that share those
compute it once.
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _fk(table: str, column: str, target: str) -> sa.ForeignKey:
    return sa.ForeignKey(f"{target}.id", name=op.f(f"fk_{table}_{column}_{target}"))


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("fact_source", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("name", name=op.f("uq_studies_name")),
    )
    op.create_table(
        "study_arms",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), _fk("study_arms", "study_id", "studies"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("run_id", sa.Integer(), _fk("study_arms", "run_id", "runs"), nullable=True),
        sa.Column("v_star_key", sa.String(64), nullable=True),
        sa.Column("flow_run_id", sa.String(64), nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_arms")),
        sa.UniqueConstraint("study_id", "name", name=op.f("uq_study_arms_study_id_name")),
        sa.CheckConstraint("mode IN ('independent', 'sequential')", name=op.f("ck_study_arms_known_mode")),
        sa.CheckConstraint("status IN ('pending', 'running', 'done', 'failed')",
                           name=op.f("ck_study_arms_arm_status")),
    )
    op.create_index(op.f("ix_study_arms_study_id"), "study_arms", ["study_id"])
    op.create_table(
        "arm_batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("arm_id", sa.Integer(), _fk("arm_batches", "arm_id", "study_arms"), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("n_facts", sa.Integer(), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("diagnostics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_arm_batches")),
        sa.UniqueConstraint("arm_id", "seq", name=op.f("uq_arm_batches_arm_id_seq")),
        sa.CheckConstraint("seq >= 1", name=op.f("ck_arm_batches_positive_seq")),
    )
    op.create_index(op.f("ix_arm_batches_arm_id"), "arm_batches", ["arm_id"])
    op.create_table(
        "arm_fact_scores",
        sa.Column("arm_batch_id", sa.Integer(), _fk("arm_fact_scores", "arm_batch_id", "arm_batches"),
                  nullable=False),
        sa.Column("fact_id", sa.Integer(), _fk("arm_fact_scores", "fact_id", "facts"), nullable=False),
        *(sa.Column(name, sa.Float(), nullable=True) for name in ("es", "ps", "ns", "em", "pm", "nm", "ge")),
        sa.PrimaryKeyConstraint("arm_batch_id", "fact_id", name=op.f("pk_arm_fact_scores")),
    )
    op.create_table(
        "v_star_cache",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("ingredients_key", sa.String(64), nullable=False),
        sa.Column("fact_id", sa.Integer(), _fk("v_star_cache", "fact_id", "facts"), nullable=False),
        sa.Column("ingredients", sa.JSON(), nullable=False),
        sa.Column("z", sa.LargeBinary(), nullable=False),
        sa.Column("final_nll", sa.Float(), nullable=False),
        sa.Column("initial_nll", sa.Float(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("stop_reason", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_v_star_cache")),
    )
    op.create_index(op.f("ix_v_star_cache_ingredients_key"), "v_star_cache", ["ingredients_key"])


def downgrade() -> None:
    op.drop_index(op.f("ix_v_star_cache_ingredients_key"), table_name="v_star_cache")
    op.drop_table("v_star_cache")
    op.drop_table("arm_fact_scores")
    op.drop_index(op.f("ix_arm_batches_arm_id"), table_name="arm_batches")
    op.drop_table("arm_batches")
    op.drop_index(op.f("ix_study_arms_study_id"), table_name="study_arms")
    op.drop_table("study_arms")
    op.drop_table("studies")
