"""Each layer delta keeps the keys it was solved for; evaluations say whether they are full or health checks.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25

Lifelong editing methods (ENCORE, AlphaEdit, MEMIT/EMMET with preserve_edits)
solve each batch against the second moment of the keys of every earlier edit,
``S = Σ K_p K_pᵀ``. That memory is part of a run's state, so it must come back
exactly after a resume or a rollback: each delta row stores its ``K_E`` (float32
safetensors) with a sha256, and ``S`` is rebuilt from the rows still applied.

Evaluations gain a ``kind``: ``full`` (the evaluation points, as before) or
``health`` (the cheap probe taken after every batch: norms, v* convergence, a
small perplexity probe), so reports can tell them apart. Existing rows are
``full``; their deltas have no keys (NULL), which only matters to a run that
would need its memory, and such runs did not exist before this revision.
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("weight_deltas") as batch:
        batch.add_column(sa.Column("keys", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("keys_sha256", sa.String(64), nullable=True))
    with op.batch_alter_table("evaluations") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="full"))
        batch.create_check_constraint(op.f("ck_evaluations_known_kind"), "kind IN ('full', 'health')")


def downgrade() -> None:
    with op.batch_alter_table("evaluations") as batch:
        batch.drop_constraint(op.f("ck_evaluations_known_kind"), type_="check")
        batch.drop_column("kind")
    with op.batch_alter_table("weight_deltas") as batch:
        batch.drop_column("keys_sha256")
        batch.drop_column("keys")
