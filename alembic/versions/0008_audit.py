"""Audit: the hash chain over batches, sealed evaluations, branches (retraction) and superseded facts.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

Batches gain ``chain_record``/``chain_sha256`` and evaluations ``seal_record``/``seal_sha256``
(:mod:`db.chain`); runs gain their lineage (``parent_run_id``, ``parent_seq``, ``retracted_fact_id``,
``branch_reason``) and facts ``superseded_by``; ``ledger_identity`` holds one random id that names the ledger
where several share a Prefect server (artifact keys, tags). A ledger written before this revision is sealed here from its
*current* contents, and the upgrade says so: the chain vouches for the ledger from the upgrade on, not for what
it held before.
"""

from __future__ import annotations

import uuid
from typing import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import Session

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("facts") as batch:
        batch.add_column(sa.Column("superseded_by", sa.Integer, nullable=True))
        batch.create_foreign_key(op.f("fk_facts_superseded_by_facts"), "facts", ["superseded_by"], ["id"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("parent_run_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("parent_seq", sa.Integer, nullable=True))
        batch.add_column(sa.Column("retracted_fact_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("branch_reason", sa.Text, nullable=True))
        batch.create_foreign_key(op.f("fk_runs_parent_run_id_runs"), "runs", ["parent_run_id"], ["id"])
        batch.create_foreign_key(op.f("fk_runs_retracted_fact_id_facts"), "facts", ["retracted_fact_id"], ["id"])
        batch.create_check_constraint(op.f("ck_runs_branch_has_point"),
                                      "(parent_run_id IS NULL) = (parent_seq IS NULL)")
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("chain_record", sa.JSON, nullable=True))
        batch.add_column(sa.Column("chain_sha256", sa.String(64), nullable=True))
    with op.batch_alter_table("evaluations") as batch:
        batch.add_column(sa.Column("seal_record", sa.JSON, nullable=True))
        batch.add_column(sa.Column("seal_sha256", sa.String(64), nullable=True))

    identity = op.create_table("ledger_identity",
                               sa.Column("id", sa.Integer, primary_key=True),
                               sa.Column("ledger_id", sa.String(36), nullable=False),
                               sa.CheckConstraint("id = 1", name=op.f("ck_ledger_identity_one_row")))
    op.bulk_insert(identity, [{"id": 1, "ledger_id": str(uuid.uuid4())}])

    from db.chain import seal_existing

    session = Session(bind=op.get_bind())
    batches, evaluations = seal_existing(session)
    session.flush()
    if batches or evaluations:
        print(f"seqedit: sealed {batches} committed batches and {evaluations} evaluations of this ledger into its "
              "hash chain from their current contents — `seqedit verify` vouches for them from now on, not for "
              "what they held before this upgrade")


def downgrade() -> None:
    op.drop_table("ledger_identity")
    with op.batch_alter_table("evaluations") as batch:
        batch.drop_column("seal_sha256")
        batch.drop_column("seal_record")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("chain_sha256")
        batch.drop_column("chain_record")
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_branch_has_point"), type_="check")
        batch.drop_constraint(op.f("fk_runs_retracted_fact_id_facts"), type_="foreignkey")
        batch.drop_constraint(op.f("fk_runs_parent_run_id_runs"), type_="foreignkey")
        batch.drop_column("branch_reason")
        batch.drop_column("retracted_fact_id")
        batch.drop_column("parent_seq")
        batch.drop_column("parent_run_id")
    with op.batch_alter_table("facts") as batch:
        batch.drop_constraint(op.f("fk_facts_superseded_by_facts"), type_="foreignkey")
        batch.drop_column("superseded_by")
