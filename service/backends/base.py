"""The one small interface every training/serving backend implements.

A backend is the only place that knows where training and serving physically happen. The worker
drives it with ``advance_*`` calls: a local backend does the whole job in one call, a remote one
submits on the first call and reports the remote status on later ones. Everything a backend
needs to remember between calls goes into the ``remote`` dict it returns, which the worker stores
in the database, so a restarted worker resumes where the last one left off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service.engine import (
    BatchSource,
    CenterIndex,
    KMeansHyperparameters,
    ParquetBatchSource,
    Prediction,
    SweepResult,
)
from service.engine.sources import FilesBatchSource
from service.statuses import EndpointStatus, JobStatus, SecondaryStatus


@dataclass(frozen=True)
class S3Object:
    """One object of a dataset in S3, as it was when the dataset was registered."""

    key: str
    size: int


@dataclass(frozen=True)
class S3Input:
    """A dataset whose rows stay in S3 (``POST /datasets/s3``), as a training reads it.

    ``source`` reads the job's columns of ``objects`` through pyarrow's S3 filesystem (opened with
    Centroid's AWS settings). ``direct_columns`` is set when the objects are headerless numeric CSV
    without nulls (``,``-separated): a consumer that takes such files as they are (SageMaker's
    KMeans) can read ``objects`` itself when its columns are exactly these, in this order.
    """

    uri: str
    bucket: str
    objects: tuple[S3Object, ...]
    skipped: tuple[S3Object, ...]
    source: FilesBatchSource
    direct_columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DatasetInput:
    """A dataset as training input: its Parquet file (or its S3 objects) and the feature columns to use."""

    dataset_id: str
    path: Path | None
    columns: list[str]
    rows: int
    s3: S3Input | None = None

    def batch_source(self) -> BatchSource:
        """The feature columns as the engine reads them, streamed (local Parquet or S3)."""
        if self.s3 is not None:
            return self.s3.source
        assert self.path is not None
        return ParquetBatchSource(self.path, self.columns)

    def record_batches(self, batch_rows: int) -> Iterator[pa.RecordBatch]:
        """The feature columns, in order, as Arrow record batches of at most ``batch_rows`` rows."""
        if self.s3 is not None:
            yield from self.s3.source.record_batches(batch_rows)
            return
        assert self.path is not None
        with pq.ParquetFile(self.path, pre_buffer=False) as parquet:
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=self.columns):
                yield batch.select(self.columns)

    @property
    def direct_s3_uri(self) -> str | None:
        """The S3 prefix whose registered objects hold exactly these features as headerless numeric
        CSV, if any (see :class:`S3Input`): what a SageMaker channel can read as it is, without a
        conversion."""
        if self.s3 is None or self.s3.direct_columns is None:
            return None
        return self.s3.uri if list(self.s3.direct_columns) == list(self.columns) else None


@dataclass(frozen=True)
class TrainingSpec:
    """Everything a backend needs to run (or resume watching) one training job."""

    job_name: str
    train: DatasetInput
    test: DatasetInput | None
    hyperparameters: KMeansHyperparameters
    resource_config: dict[str, Any]
    remote: dict[str, Any]
    stop_requested: bool = False


@dataclass(frozen=True)
class TrainedModel:
    """A finished model as a backend hands it over for registration."""

    centroids: np.ndarray
    artifact: bytes
    metrics: dict[str, Any]
    cluster_sizes: list[int] | None
    engine_version: str | None
    seed: int | None


@dataclass
class TrainingUpdate:
    """What the worker writes back to the job after one ``advance_training`` call.

    ``secondary_status`` is a :class:`SecondaryStatus`, or SageMaker's own finer value as it
    reports it (``LaunchingMLInstances``, ``MaxRuntimeExceeded``, ...)."""

    status: JobStatus
    secondary_status: str
    message: str | None = None
    failure_reason: str | None = None
    points_processed: int | None = None
    points_total: int | None = None
    training_seconds: float | None = None
    billable_seconds: float | None = None
    remote: dict[str, Any] = field(default_factory=dict)
    transitions: list[dict[str, Any]] | None = None
    result: TrainedModel | None = None
    poll_after_seconds: float | None = None

    @classmethod
    def failed(cls, reason: str, **more: Any) -> TrainingUpdate:
        """The job failed, for ``reason`` (shown to the user)."""
        return cls(JobStatus.FAILED, SecondaryStatus.FAILED, failure_reason=reason, **more)

    @classmethod
    def stopped(cls, message: str = "stopped on request", **more: Any) -> TrainingUpdate:
        """The job stopped as asked."""
        return cls(JobStatus.STOPPED, SecondaryStatus.STOPPED, message=message, **more)

    @classmethod
    def completed(cls, result: TrainedModel, **more: Any) -> TrainingUpdate:
        """The job finished with ``result``."""
        return cls(JobStatus.COMPLETED, SecondaryStatus.COMPLETED, result=result, **more)

    @classmethod
    def running(cls, secondary_status: str, **more: Any) -> TrainingUpdate:
        """The job runs (or is being started), at ``secondary_status``."""
        return cls(JobStatus.IN_PROGRESS, secondary_status, **more)


@dataclass(frozen=True)
class SweepSpec:
    """Everything a backend needs to run (or resume watching) one sweep: every k of ``ks`` trained
    with ``hyperparameters`` (its ``k`` replaced by each), then evaluated on ``test`` (else
    ``train``) with the scores computed on ``sample_size`` rows."""

    name: str
    train: DatasetInput
    test: DatasetInput | None
    ks: list[int]
    hyperparameters: KMeansHyperparameters
    sample_size: int
    remote: dict[str, Any]
    stop_requested: bool = False


@dataclass
class SweepUpdate:
    """What the worker writes back to the sweep after one ``advance_sweep`` call.

    ``result`` is set once every k is trained and evaluated; ``artifacts`` holds each k's model
    artifact as its trainer wrote it (SageMaker's ``model.tar.gz``) when there is one to keep
    (a local sweep's models are written from the shared local centers instead)."""

    status: JobStatus
    message: str | None = None
    failure_reason: str | None = None
    remote: dict[str, Any] = field(default_factory=dict)
    result: SweepResult | None = None
    artifacts: dict[int, bytes] | None = None
    rows_total: int | None = None
    poll_after_seconds: float | None = None

    @classmethod
    def failed(cls, reason: str, **more: Any) -> SweepUpdate:
        return cls(JobStatus.FAILED, failure_reason=reason, **more)

    @classmethod
    def stopped(cls, message: str, **more: Any) -> SweepUpdate:
        return cls(JobStatus.STOPPED, message=message, **more)

    @classmethod
    def completed(cls, result: SweepResult, **more: Any) -> SweepUpdate:
        return cls(JobStatus.COMPLETED, message="sweep completed", result=result, **more)


class TrainingHooks(Protocol):
    """How a running training reports back: progress, and whether to stop."""

    def progress(self, points_processed: int, points_total: int) -> None: ...

    def should_stop(self) -> bool: ...


@dataclass(frozen=True)
class ServedModel:
    """A model as endpoints need it."""

    model_id: str
    centroids: np.ndarray
    feature_names: list[str]
    artifact: Callable[[], bytes]

    @cached_property
    def index(self) -> CenterIndex:
        """The centroids prepared for nearest-center queries, built once per loaded model."""
        return CenterIndex(self.centroids)


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    model: ServedModel
    instance_config: dict[str, Any]
    remote: dict[str, Any]


@dataclass
class EndpointUpdate:
    """What the worker writes back to the endpoint after one ``advance_endpoint`` or
    ``delete_endpoint`` call; ``gone`` when a delete has finished (the row is then removed)."""

    status: EndpointStatus
    failure_reason: str | None = None
    remote: dict[str, Any] = field(default_factory=dict)
    poll_after_seconds: float | None = None
    gone: bool = False

    @classmethod
    def deleted(cls) -> EndpointUpdate:
        """Nothing of the endpoint remains."""
        return cls(EndpointStatus.DELETING, gone=True)

    @classmethod
    def failed(cls, reason: str, **more: Any) -> EndpointUpdate:
        """The endpoint (or its change) failed, for ``reason``."""
        return cls(EndpointStatus.FAILED, failure_reason=reason, **more)


@dataclass(frozen=True)
class BackendStatus:
    name: str
    configured: bool
    detail: str
    settings: dict[str, Any] = field(default_factory=dict)


class BackendNotConfigured(Exception):
    """The backend lacks settings it needs; the message says which."""


class Backend(Protocol):
    """Train and serve k-means models somewhere."""

    name: str
    #: Training runs inside the worker's process and holds it busy until done (the local engine);
    #: otherwise it runs elsewhere and the worker only polls it (a remote service).
    trains_in_process: bool

    def status(self) -> BackendStatus:
        """Whether the backend can be used, without revealing secrets."""
        ...

    def ensure_configured(self) -> None:
        """Raise :class:`BackendNotConfigured` when a job or endpoint could not run."""
        ...

    def advance_training(self, spec: TrainingSpec, hooks: TrainingHooks) -> TrainingUpdate:
        """Move a job forward: start it, or report how it is doing."""
        ...

    def stop_training(self, spec: TrainingSpec) -> None:
        """Ask a running job to stop (the worker records the outcome on a later advance)."""
        ...

    def advance_sweep(self, spec: SweepSpec, hooks: TrainingHooks) -> SweepUpdate:
        """Move a sweep forward: run it (in process), or start and follow its trainings (remote)."""
        ...

    def stop_sweep(self, spec: SweepSpec) -> None:
        """Ask a running sweep's remote trainings to stop (recorded on a later advance)."""
        ...

    def advance_endpoint(self, spec: EndpointSpec) -> EndpointUpdate:
        """Bring an endpoint (or its switch to ``spec.model``) towards InService."""
        ...

    def delete_endpoint(self, spec: EndpointSpec) -> EndpointUpdate:
        """Tear an endpoint down; :meth:`EndpointUpdate.deleted` when nothing remains."""
        ...

    def invoke(self, spec: EndpointSpec, features: np.ndarray) -> Prediction:
        """Closest cluster and distance for each row of ``features``."""
        ...
