"""Batches keep the diagnostics of their edit (memorization per layer, v* convergence).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

An edit can "succeed" while writing only part of what it was asked to: a
least-squares or ridge-regularised solve leaves a share of the residual out.
The share each layer actually wrote (``1 − ‖Ŵ K_E − V_E‖ / ‖R‖``) is the audit
trail that shows it, so it is stored with the batch. Batches of older ledgers
have none (NULL); nothing else changes.
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("diagnostics", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("diagnostics")
