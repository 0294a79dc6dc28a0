"""zsRE and the answers without teacher forcing: the neighbourhood answer of a fact, the new per-fact scores.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

A fact may carry the answer its neighbourhood prompts should keep (zsRE's ``loc_ans``,
EasyEdit's ``locality_ground_truth``); facts ingested before keep NULL, which means
``target_true`` — what their neighbourhood prompts were always scored against. An
independent arm's per-fact scores gain the token accuracies under teacher forcing and
the WILD exact-match answers; rows written before stay NULL there (not measured).
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_SCORES = ("rewrite_acc", "rephrase_acc", "locality_acc", "wild_rewrite", "wild_rephrase")


def upgrade() -> None:
    with op.batch_alter_table("facts") as batch:
        batch.add_column(sa.Column("neighborhood_answer", sa.Text, nullable=True))
    with op.batch_alter_table("arm_fact_scores") as batch:
        for name in NEW_SCORES:
            batch.add_column(sa.Column(name, sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("arm_fact_scores") as batch:
        for name in reversed(NEW_SCORES):
            batch.drop_column(name)
    with op.batch_alter_table("facts") as batch:
        batch.drop_column("neighborhood_answer")
