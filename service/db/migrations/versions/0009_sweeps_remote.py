"""sweeps on SageMaker: a sweep keeps what its backend needs between polls (one training job per k)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The default fills the rows already there, then goes: the ORM writes every new row's value.
    with op.batch_alter_table("sweeps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("remote", sa.JSON(), nullable=False, server_default="{}"))
    with op.batch_alter_table("sweeps", schema=None) as batch_op:
        batch_op.alter_column("remote", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("sweeps", schema=None) as batch_op:
        batch_op.drop_column("remote")
