"""ORM tables. Called tables, not models: "models" are the k-means kind here."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.db.types import UTCDateTime, utcnow
from service.errors import Conflict


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class DataNotStored(Conflict):
    """An operation that reads Centroid's own Parquet file asked for one of a dataset in S3."""


class DatasetTable(Base):
    """A stored table: metadata here, rows in a Parquet file in the artifact store, or (a dataset
    registered from S3) in S3 objects that ``location`` lists."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    key_column: Mapped[str | None] = mapped_column(String(256))
    columns: Mapped[list[Any]] = mapped_column()
    row_count: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # The Parquet file's key in the artifact store; "" for a dataset in S3 (see ``storage_key``).
    stored_key: Mapped[str] = mapped_column("storage_key", String(300))
    # A dataset registered from S3 (migration 0007): the URI, the format and how to read it, and
    # every object (key, size, rows) as registered. NULL for the datasets Centroid stores.
    location: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    recipe: Mapped[dict[str, Any]] = mapped_column()
    # Source, parent, direct inputs, depth, datasets, steps and bytes of ``recipe``: what listings
    # show, so they never read recipes (migration 0004 filled it in for older rows).
    recipe_summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Per-column count, nulls, min, max, mean, std, computed while the file was written (migration
    # 0005); NULL for older rows, whose summary is computed row group by row group when read.
    summary: Mapped[list[Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    @property
    def in_s3(self) -> bool:
        """The rows stay in S3 (``location``); Centroid holds no file of them."""
        return self.location is not None

    @property
    def storage_key(self) -> str:
        """The artifact-store key of the dataset's Parquet file.

        A dataset in S3 has none: asking for it is refused with a 409 (:class:`DataNotStored`) that
        says so, so every operation written for stored Parquet files (predictions for a
        ``dataset_id``, model assignments) refuses such a dataset clearly instead of failing on a
        missing file. Code that handles datasets in S3 checks :attr:`in_s3` first.
        """
        if self.location is not None:
            uri = self.location.get("uri")
            raise DataNotStored(
                f"dataset {self.id!r} stays in S3 ({uri}) and Centroid holds no copy of its rows; this operation "
                "reads only the datasets Centroid stores (uploads and derives). A dataset in S3 can be trained on, "
                "read (GET /datasets/{id}/rows) and downloaded as CSV; for anything else, upload the data "
                "(POST /datasets)",
                details={"dataset_id": self.id, "uri": uri, "reason": "dataset_in_s3"},
            )
        return self.stored_key

    @storage_key.setter
    def storage_key(self, value: str) -> None:
        self.stored_key = value


class DatasetTaskTable(Base):
    """An upload or derive run in the background; claimable by one worker at a time (leases).

    ``dataset_id`` is chosen when the task is made, so running it again after a crash commits the
    same dataset once; the dataset row and the task's completion are committed together."""

    __tablename__ = "dataset_tasks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), index=True)
    # A derive's input and every dataset it joins (what a delete must wait for), not foreign keys:
    # a finished task does not keep its inputs alive.
    parent_id: Mapped[str | None] = mapped_column(String(40))
    input_ids: Mapped[list[Any]] = mapped_column(default=list)
    request: Mapped[dict[str, Any]] = mapped_column()
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    dataset_id: Mapped[str] = mapped_column(String(40))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    next_poll_at: Mapped[datetime | None] = mapped_column()


class TrainingJobTable(Base):
    """A training job; its lease columns make it claimable by exactly one worker at a time."""

    __tablename__ = "training_jobs"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    backend: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), index=True)
    secondary_status: Mapped[str] = mapped_column(String(40))
    status_message: Mapped[str | None] = mapped_column(Text)
    status_transitions: Mapped[list[Any]] = mapped_column(default=list)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    train_dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    test_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), index=True)
    feature_columns: Mapped[list[Any]] = mapped_column()
    hyperparameters: Mapped[dict[str, Any]] = mapped_column()
    resource_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    points_processed: Mapped[int] = mapped_column(BigInteger, default=0)
    points_total: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    training_seconds: Mapped[float | None] = mapped_column(Float)
    billable_seconds: Mapped[float | None] = mapped_column(Float)
    stop_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    next_poll_at: Mapped[datetime | None] = mapped_column()
    remote: Mapped[dict[str, Any]] = mapped_column(default=dict)
    model_id: Mapped[str | None] = mapped_column(String(40))


class SweepTable(Base):
    """A sweep: every k of a range trained from one pass (see service.engine.sweep), claimed by
    one worker at a time under a lease like a training job."""

    __tablename__ = "sweeps"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    backend: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), index=True)
    status_message: Mapped[str | None] = mapped_column(Text)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    train_dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    test_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), index=True)
    feature_columns: Mapped[list[Any]] = mapped_column()
    k_values: Mapped[list[Any]] = mapped_column()
    hyperparameters: Mapped[dict[str, Any]] = mapped_column()  # of the largest k; each k replaces it
    sample_size: Mapped[int] = mapped_column(Integer)
    rows_processed: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_total: Mapped[int] = mapped_column(BigInteger, default=0)
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # per-k metrics, recommendation, models
    # What a registered k's model is built from: each k's centroids and the shared local centers and
    # weights (grows with k x d and K x d). Read only to register a model, never by a listing.
    trained_state: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # A remote backend's state between polls (SageMaker: the data's S3 location, each k's training job).
    remote: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    stop_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    next_poll_at: Mapped[datetime | None] = mapped_column()


class ModelTable(Base):
    """A trained (or imported) k-means model: centroids plus everything needed to serve them."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    source: Mapped[str] = mapped_column(String(20))
    training_job_name: Mapped[str | None] = mapped_column(ForeignKey("training_jobs.name"), unique=True)
    train_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), index=True)
    key_column: Mapped[str | None] = mapped_column(String(256))
    feature_names: Mapped[list[Any]] = mapped_column()
    k: Mapped[int] = mapped_column(Integer)
    feature_dim: Mapped[int] = mapped_column(Integer)
    centroids: Mapped[list[Any]] = mapped_column()
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    recipe: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    cluster_sizes: Mapped[list[Any] | None] = mapped_column(JSON)
    engine_version: Mapped[str | None] = mapped_column(String(40))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    artifact_key: Mapped[str] = mapped_column(String(300))
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    artifact_size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class EndpointTable(Base):
    """A deployment of a model; ``pending_model_id`` is the model being switched to."""

    __tablename__ = "endpoints"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    backend: Mapped[str] = mapped_column(String(20))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    pending_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    instance_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    remote: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    next_poll_at: Mapped[datetime | None] = mapped_column()


class WorkerTable(Base):
    """Workers announce themselves and heartbeat here (what /metrics reports on)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_poll_at: Mapped[datetime | None] = mapped_column()
    current_job: Mapped[str | None] = mapped_column(String(63))


class ChangeCounterTable(Base):
    """Monotonic counters other processes poll to notice changes (one row per counter name).

    ``serving`` is bumped in the same transaction as every change to what endpoints serve (an
    endpoint entering or leaving service, a switch completing) and every delete of a model or
    dataset; API processes compare it with the value their in-process caches were built from.
    """

    __tablename__ = "change_counters"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
