"""training jobs, models, endpoints, workers

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import service.db.types

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", service.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", service.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_poll_at", service.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("current_job", sa.String(length=63), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "training_jobs",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("backend", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("secondary_status", sa.String(length=40), nullable=False),
        sa.Column("status_message", sa.Text(), nullable=True),
        sa.Column("status_transitions", sa.JSON(), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("train_dataset_id", sa.String(length=40), nullable=False),
        sa.Column("test_dataset_id", sa.String(length=40), nullable=True),
        sa.Column("feature_columns", sa.JSON(), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("resource_config", sa.JSON(), nullable=False),
        sa.Column("points_processed", sa.BigInteger(), nullable=False),
        sa.Column("points_total", sa.BigInteger(), nullable=False),
        sa.Column("created_at", service.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", service.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("ended_at", service.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("training_seconds", sa.Float(), nullable=True),
        sa.Column("billable_seconds", sa.Float(), nullable=True),
        sa.Column("stop_requested", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=100), nullable=True),
        sa.Column("lease_expires_at", service.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("next_poll_at", service.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("remote", sa.JSON(), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=True),
        sa.ForeignKeyConstraint(
            ["test_dataset_id"],
            ["datasets.id"],
        ),
        sa.ForeignKeyConstraint(
            ["train_dataset_id"],
            ["datasets.id"],
        ),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("training_jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_training_jobs_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_training_jobs_lease_expires_at"), ["lease_expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_training_jobs_status"), ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_training_jobs_test_dataset_id"), ["test_dataset_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_training_jobs_train_dataset_id"), ["train_dataset_id"], unique=False)

    op.create_table(
        "models",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("training_job_name", sa.String(length=63), nullable=True),
        sa.Column("train_dataset_id", sa.String(length=40), nullable=True),
        sa.Column("key_column", sa.String(length=256), nullable=True),
        sa.Column("feature_names", sa.JSON(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("feature_dim", sa.Integer(), nullable=False),
        sa.Column("centroids", sa.JSON(), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("recipe", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("cluster_sizes", sa.JSON(), nullable=True),
        sa.Column("engine_version", sa.String(length=40), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("artifact_key", sa.String(length=300), nullable=False),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=False),
        sa.Column("artifact_size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", service.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["train_dataset_id"],
            ["datasets.id"],
        ),
        sa.ForeignKeyConstraint(
            ["training_job_name"],
            ["training_jobs.name"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("training_job_name"),
    )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_models_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_models_name"), ["name"], unique=False)
        batch_op.create_index(batch_op.f("ix_models_train_dataset_id"), ["train_dataset_id"], unique=False)

    op.create_table(
        "endpoints",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("backend", sa.String(length=20), nullable=False),
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("pending_model_id", sa.String(length=40), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("instance_config", sa.JSON(), nullable=False),
        sa.Column("remote", sa.JSON(), nullable=False),
        sa.Column("created_at", service.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", service.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=100), nullable=True),
        sa.Column("lease_expires_at", service.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("next_poll_at", service.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
        ),
        sa.ForeignKeyConstraint(
            ["pending_model_id"],
            ["models.id"],
        ),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("endpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_endpoints_model_id"), ["model_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_endpoints_pending_model_id"), ["pending_model_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_endpoints_status"), ["status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("endpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_endpoints_status"))
        batch_op.drop_index(batch_op.f("ix_endpoints_pending_model_id"))
        batch_op.drop_index(batch_op.f("ix_endpoints_model_id"))

    op.drop_table("endpoints")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_models_train_dataset_id"))
        batch_op.drop_index(batch_op.f("ix_models_name"))
        batch_op.drop_index(batch_op.f("ix_models_created_at"))

    op.drop_table("models")
    with op.batch_alter_table("training_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_jobs_train_dataset_id"))
        batch_op.drop_index(batch_op.f("ix_training_jobs_test_dataset_id"))
        batch_op.drop_index(batch_op.f("ix_training_jobs_status"))
        batch_op.drop_index(batch_op.f("ix_training_jobs_lease_expires_at"))
        batch_op.drop_index(batch_op.f("ix_training_jobs_created_at"))

    op.drop_table("training_jobs")
    op.drop_table("workers")
