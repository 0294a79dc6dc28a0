"""Evaluation requests: evaluation points handed to other processes (Prefect workers) and tracked to completion.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25

With ``eval_mode: async`` an evaluation point is a flow run of its own, picked up by
a worker while the editing loop goes on. The ledger tracks each point so that none
is lost and none evaluated twice: a request is ``pending`` until a worker claims it
(``running``, with a lease the worker renews), ``done`` when its metrics are
recorded — in the same transaction — or ``failed``. A request whose worker died
(lease run out, flow run crashed or gone) is claimed again. At most one request per
batch is open or done.
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evaluation_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", name=op.f("fk_evaluation_requests_run_id_runs")),
                  nullable=False),
        sa.Column("batch_id", sa.Integer(),
                  sa.ForeignKey("batches.id", name=op.f("fk_evaluation_requests_batch_id_batches")), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("flow_run_id", sa.String(64), nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("evaluation_id", sa.Integer(),
                  sa.ForeignKey("evaluations.id", name=op.f("fk_evaluation_requests_evaluation_id_evaluations")),
                  nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluation_requests")),
        sa.CheckConstraint("status IN ('pending', 'running', 'done', 'failed')",
                           name=op.f("ck_evaluation_requests_request_status")),
    )
    op.create_index("uq_evaluation_requests_batch_id", "evaluation_requests", ["batch_id"], unique=True,
                    sqlite_where=sa.text("status <> 'failed'"), postgresql_where=sa.text("status <> 'failed'"))
    op.create_index(op.f("ix_evaluation_requests_run_id"), "evaluation_requests", ["run_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_evaluation_requests_run_id"), table_name="evaluation_requests")
    op.drop_index("uq_evaluation_requests_batch_id", table_name="evaluation_requests")
    op.drop_table("evaluation_requests")
