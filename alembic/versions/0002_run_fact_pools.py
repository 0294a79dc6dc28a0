"""Runs choose their facts: a shared pool or a private one, optionally of one source.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

A scheduled bulk update edits each pending fact once, whichever run takes it
(``shared``, the behaviour of 0001). A study compares algorithms on the *same*
facts, so its runs must each edit every fact of a source without consuming
them for the others (``private``). Existing runs become ``shared`` with no
source filter, which is what they did.
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("fact_pool", sa.String(16), nullable=False, server_default="shared"))
        batch.add_column(sa.Column("fact_source", sa.String(200), nullable=True))
        batch.create_check_constraint(op.f("ck_runs_known_fact_pool"), "fact_pool IN ('shared', 'private')")


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_known_fact_pool"), type_="check")
        batch.drop_column("fact_source")
        batch.drop_column("fact_pool")
