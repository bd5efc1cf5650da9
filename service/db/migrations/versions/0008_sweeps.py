"""sweeps: every k of a range from one streaming pass, run by workers under leases

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import service.db.types

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("backend", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("status_message", sa.Text(), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("train_dataset_id", sa.String(length=40), nullable=False),
        sa.Column("test_dataset_id", sa.String(length=40), nullable=True),
        sa.Column("feature_columns", sa.JSON(), nullable=False),
        sa.Column("k_values", sa.JSON(), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("sample_size", sa.Integer(), nullable=False),
        sa.Column("rows_processed", sa.BigInteger(), nullable=False),
        sa.Column("rows_total", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=True),
        sa.Column("trained_state", sa.JSON(), nullable=True),
        sa.Column("created_at", service.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", service.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("ended_at", service.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("stop_requested", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=100), nullable=True),
        sa.Column("lease_expires_at", service.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("next_poll_at", service.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["train_dataset_id"], ["datasets.id"]),
        sa.ForeignKeyConstraint(["test_dataset_id"], ["datasets.id"]),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("sweeps", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sweeps_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_sweeps_lease_expires_at"), ["lease_expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_sweeps_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_sweeps_train_dataset_id"), ["train_dataset_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_sweeps_test_dataset_id"), ["test_dataset_id"], unique=False)


def downgrade() -> None:
    op.drop_table("sweeps")
