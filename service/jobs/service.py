"""Training job use cases: submit, inspect, stop, delete."""

from __future__ import annotations

from typing import Any, cast

import pyarrow.parquet as pq
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.jobs import BackendName, Progress, StatusTransition, TrainingJob, TrainingJobCreate
from service.backends.registry import BackendRegistry
from service.datasets.repository import DatasetRepository
from service.db.changes import announce_work, work_committed
from service.db.tables import DatasetTable, TrainingJobTable
from service.db.types import utcnow
from service.engine import HyperparameterError, KMeansHyperparameters, ParameterProblem
from service.engine.hyperparameters import SAGEMAKER_CONTAINER_PARAMETERS
from service.errors import Conflict, InvalidInput, NotFound
from service.jobs.repository import FINAL_STATUSES, JobRepository
from service.settings import Settings
from service.statuses import JobStatus, SecondaryStatus
from service.storage import LocalArtifactStore

NUMERIC_DTYPES = ("int64", "float64")

#: Training input modes of SageMaker's KMeans (its documentation: File or Pipe, for CSV and
#: recordIO-protobuf alike); ``FastFile`` is refused.
KMEANS_INPUT_MODES = ("File", "Pipe")
#: The longest ``MaxWaitTimeInSeconds`` SageMaker allows a managed spot job of a built-in algorithm
#: that writes no checkpoints, such as KMeans.
SPOT_MAX_WAIT_SECONDS = 3600
#: Instance families with local NVMe instance storage (encrypted by the hardware), where SageMaker
#: refuses a ``VolumeKmsKeyId``.
LOCAL_STORAGE_FAMILIES = frozenset(
    {"c5d", "m5d", "r5d", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en"}
    | {"g4dn", "g5", "g6", "g6e", "trn1", "trn1n", "trn2"}
)
#: Job options the local backend refuses: promises (network placement, encryption with the
#: caller's key) it cannot keep. Every other option it ignores, and lists in ``ignored_options``.
LOCAL_REFUSED_OPTIONS = {
    "vpc_config": "the local backend trains in the worker's process, not in your VPC",
    "volume_kms_key_id": "the local backend does not encrypt its working files with your KMS key",
    "output_kms_key_id": "the local backend stores the model artifact on its own disk, not encrypted with your KMS key",
}


def transition(status: str, message: str | None = None) -> dict[str, Any]:
    return {"status": status, "start_time": utcnow().isoformat(), "end_time": None, "message": message}


def hyperparameter_error(exc: HyperparameterError) -> InvalidInput:
    return InvalidInput(str(exc), details=[{"parameter": p.parameter, "message": p.message} for p in exc.errors])


def hyperparameter_ceilings(settings: Settings) -> dict[str, int]:
    """The configured ceilings, by hyperparameter name (see the settings ``max_*``)."""
    return {
        "k": settings.max_k,
        "epochs": settings.max_epochs,
        "mini_batch_size": settings.max_mini_batch_size,
        "extra_center_factor": settings.max_extra_center_factor,
        "local_lloyd_num_trials": settings.max_lloyd_trials,
        "local_lloyd_max_iter": settings.max_lloyd_iterations,
    }


class JobService:
    def __init__(
        self, session: Session, store: LocalArtifactStore, backends: BackendRegistry, settings: Settings
    ) -> None:
        self.session = session
        self.jobs = JobRepository(session)
        self.datasets = DatasetRepository(session)
        self.store = store
        self.backends = backends
        self.settings = settings

    def create(self, request: TrainingJobCreate) -> TrainingJobTable:
        if self.jobs.find(request.name) is not None:
            raise Conflict(f"training job {request.name!r} already exists", details={"name": request.name})
        self.backends.usable(request.backend)
        options = job_options(request, self.settings)
        # A concurrent DELETE /datasets/{id} must not give a 500 or a wrong "already exists": each
        # dataset is held until the commit (PostgreSQL: FOR KEY SHARE), so the delete waits for this
        # job (and then sees it) or removes the dataset first (found gone here); on SQLite a missing
        # file or a foreign-key failure is read again below to answer 409 with the true reason.
        dataset_ids = [i for i in (request.train_dataset_id, request.test_dataset_id) if i]

        def deleted(dataset_id: str) -> Conflict:
            return Conflict(
                f"dataset {dataset_id!r} was deleted while training job {request.name!r} was being created",
                details={"dataset_id": dataset_id, "reason": "dataset_deleted"},
            )

        def held(dataset: DatasetTable) -> DatasetTable:
            if self.session.get(DatasetTable, dataset.id, with_for_update={"read": True, "key_share": True}) is None:
                raise deleted(dataset.id)
            return dataset

        def gone() -> list[str]:
            return [i for i in dataset_ids if self.session.get(DatasetTable, i, populate_existing=True) is None]

        train = held(self.datasets.get(request.train_dataset_id))
        try:
            features = request.feature_columns or default_features(train)
            self.check_features(train, features, "training")
            test = held(self.datasets.get(request.test_dataset_id)) if request.test_dataset_id else None
            if test is not None:
                self.check_features(test, features, "test")
        except FileNotFoundError as exc:  # the file went with its dataset, after the checks above
            missing = gone()
            if missing:
                raise deleted(missing[0]) from exc
            raise
        hyperparameters = self.hyperparameters_for(
            request.hyperparameters.model_dump(exclude_none=True), train, test, features
        )
        row = TrainingJobTable(
            name=request.name,
            backend=request.backend,
            status=JobStatus.PENDING,
            secondary_status=SecondaryStatus.STARTING,
            status_message="waiting for a worker",
            status_transitions=[transition(SecondaryStatus.STARTING, "waiting for a worker")],
            train_dataset_id=train.id,
            test_dataset_id=test.id if test else None,
            feature_columns=features,
            hyperparameters=hyperparameters.to_dict(),
            resource_config=options,
            points_total=train.row_count * hyperparameters.epochs,
            remote={},
        )
        try:
            self.jobs.add(row)
            announce_work(self.session)
            self.session.commit()
        except IntegrityError as exc:
            self.session.rollback()
            if self.jobs.find(request.name) is not None:
                raise Conflict(f"training job {request.name!r} already exists", details={"name": request.name}) from exc
            missing = gone()
            if missing:
                raise deleted(missing[0]) from exc
            raise Conflict(
                f"a concurrent change conflicted while training job {request.name!r} was being created; retry",
                details={"name": request.name},
            ) from exc
        work_committed()
        return row

    def hyperparameters_for(
        self, raw: dict[str, Any], train: DatasetTable, test: DatasetTable | None, features: list[str]
    ) -> KMeansHyperparameters:
        """``raw`` validated for training on ``train`` (and ``test``) with ``features``, within the
        service's ceilings; 400 naming every problem."""
        raw = {**raw}
        raw.setdefault("feature_dim", len(features))
        try:
            hyperparameters = KMeansHyperparameters.from_mapping(raw, ceilings=hyperparameter_ceilings(self.settings))
            values = hyperparameters.k * hyperparameters.feature_dim
            if values > self.settings.max_centroid_values:
                limit = self.settings.max_centroid_values
                message = f"k x feature_dim ({values}) must be <= {limit}, this service's ceiling on centroid values"
                raise HyperparameterError([ParameterProblem("k", message)])
            local = hyperparameters.k * hyperparameters.effective_extra_center_factor
            if local > self.settings.max_local_centers:
                limit = self.settings.max_local_centers
                message = (
                    f"k x extra_center_factor ({local} local centers) must be <= {limit}, this service's ceiling "
                    "(CENTROID_MAX_LOCAL_CENTERS)"
                )
                raise HyperparameterError([ParameterProblem("extra_center_factor", message)])
            hyperparameters.validate_against(train.row_count, len(features))
            if test is not None:
                hyperparameters.validate_against(test.row_count, len(features), what="test")
        except HyperparameterError as exc:
            raise hyperparameter_error(exc) from exc
        return hyperparameters

    def check_features(self, dataset: DatasetTable, features: list[str], role: str) -> None:
        """Feature columns must exist, be numeric, and hold no nulls."""
        dtypes = {c["name"]: c["dtype"] for c in dataset.columns}
        missing = [f for f in features if f not in dtypes]
        if missing:
            raise InvalidInput(
                f"feature column(s) {', '.join(map(repr, missing))} are not in the {role} dataset {dataset.id!r}",
                details={"missing": missing, "columns": list(dtypes)},
            )
        if len(set(features)) != len(features):
            raise InvalidInput("feature columns must not repeat", details={"feature_columns": features})
        for name in features:
            if dtypes[name] not in NUMERIC_DTYPES or name == dataset.key_column:
                raise InvalidInput(
                    f"feature column {name!r} of the {role} dataset is not numeric ({dtypes[name]})",
                    details={"column": name, "dtype": dtypes[name]},
                )
        if dataset.in_s3:  # counted from the objects when the dataset was registered
            counted = {entry["name"]: int(entry.get("null_count") or 0) for entry in dataset.summary or []}
            nulls = {name: counted.get(name, 0) for name in features}
        else:
            nulls = null_counts(self.store.path(dataset.storage_key), features)
        holes = {name: count for name, count in nulls.items() if count}
        if holes:
            raise InvalidInput(
                f"feature columns of the {role} dataset have nulls ({holes}); derive with dropna or fillna first",
                details={"null_counts": holes},
            )

    def get(self, name: str) -> TrainingJobTable:
        return self.jobs.get(name)

    def page(self, offset: int, limit: int, status: str | None) -> tuple[list[TrainingJobTable], int]:
        return self.jobs.page(offset, limit, status)

    def stop(self, name: str) -> TrainingJobTable:
        """Pending jobs stop at once; running ones are asked to stop and become Stopping."""
        job = self.jobs.get(name)
        if job.status in FINAL_STATUSES:
            raise Conflict(f"training job {name!r} is already {job.status}", details={"status": job.status})
        message = "stopped before it started"
        transitions = [*job.status_transitions, transition(SecondaryStatus.STOPPED, message)]
        if not self.jobs.stop_if_unclaimed(job, message, transitions):
            self.jobs.request_stop(name)
        announce_work(self.session)
        self.session.commit()
        self.session.refresh(job)  # the job as this request left it: a woken worker may stop it at once
        work_committed()
        return job

    def delete(self, name: str) -> None:
        """Delete a job that ended (Completed, Failed, Stopped); 409 while it may still run.

        The model it trained stays (its ``training_job_name`` becomes null; its ``name`` is the
        job's). Its datasets are no longer used by the job, so they can be deleted once no model or
        other job uses them.
        """
        job = self.jobs.get(name)
        if job.status not in FINAL_STATUSES:
            raise Conflict(
                f"training job {name!r} is {job.status}; only a Completed, Failed or Stopped job can be deleted "
                f"(stop it first: POST /training-jobs/{name}/stop)",
                details={"name": name, "status": job.status},
            )
        deleted = self.jobs.delete_ended(name)
        if not deleted:  # deleted meanwhile by another request (a final job never becomes active again)
            self.session.rollback()
            raise NotFound(f"training job {name!r} not found", details={"name": name})
        self.session.commit()


def job_options(request: TrainingJobCreate, settings: Settings) -> dict[str, Any]:
    """The job options to store: as given, with managed spot training's limits resolved; a 400
    naming every option SageMaker would refuse (checked for both backends, so a job the local
    backend accepts runs on SageMaker too), or that the local backend cannot honour."""
    options = request.resource_config.model_dump(exclude_defaults=True)
    problems: list[tuple[str, str]] = []
    mode = options.get("input_mode")
    if mode is not None and mode not in KMEANS_INPUT_MODES:
        problems.append(("input_mode", f"SageMaker's KMeans trains in File or Pipe mode only, not {mode}"))
    if options.get("enable_managed_spot_training"):
        problems += _spot_limits(options, settings)
    elif "max_wait_seconds" in options:
        problems.append(
            ("max_wait_seconds", "applies to managed spot training only: set enable_managed_spot_training to true")
        )
    if "volume_kms_key_id" in options:
        instance_type = str(options.get("instance_type") or settings.training_instance_type)
        family = instance_type.split(".")[1] if instance_type.count(".") >= 2 else ""
        if family in LOCAL_STORAGE_FAMILIES:
            problems.append(
                (
                    "volume_kms_key_id",
                    f"not with {instance_type}: its local NVMe storage is encrypted by the hardware and SageMaker "
                    "refuses a VolumeKmsKeyId for it",
                )
            )
    if request.backend == "local":
        problems += [(name, why) for name, why in LOCAL_REFUSED_OPTIONS.items() if name in options]
    if problems:
        raise InvalidInput(
            "invalid job options: " + "; ".join(f"resource_config.{name}: {message}" for name, message in problems),
            details=[{"option": name, "message": message} for name, message in problems],
        )
    return options


def _spot_limits(options: dict[str, Any], settings: Settings) -> list[tuple[str, str]]:
    """Managed spot training: fill in ``max_wait_seconds`` (3600) and ``max_runtime_seconds`` (the
    setting, at most the wait) in ``options``; the problems SageMaker would refuse."""
    wait = int(options.setdefault("max_wait_seconds", SPOT_MAX_WAIT_SECONDS))
    if wait > SPOT_MAX_WAIT_SECONDS:
        return [
            (
                "max_wait_seconds",
                f"must be <= {SPOT_MAX_WAIT_SECONDS} for SageMaker's KMeans (a built-in algorithm without "
                f"checkpoints), got {wait}",
            )
        ]
    runtime = int(options.setdefault("max_runtime_seconds", min(settings.max_runtime_seconds, wait)))
    if runtime > wait:
        return [
            (
                "max_runtime_seconds",
                f"must be <= max_wait_seconds ({wait}): SageMaker's MaxWaitTimeInSeconds counts the wait for Spot "
                f"capacity plus the training, got {runtime}",
            )
        ]
    return []


def ignored_options(backend: str, options: dict[str, Any]) -> list[str]:
    """The stored job options ``backend`` does not use: on local, all of them (it refuses the ones
    it cannot honour at creation); SageMaker uses every one."""
    return [] if backend == "sagemaker" else sorted(options)


def spot_savings_percent(row: TrainingJobTable) -> float | None:
    """SageMaker's managed spot saving, (1 - billable / training) x 100; None unless known."""
    if row.backend != "sagemaker" or not (row.resource_config or {}).get("enable_managed_spot_training"):
        return None
    if not row.training_seconds or row.billable_seconds is None:
        return None
    return round(100.0 * (1.0 - row.billable_seconds / row.training_seconds), 2)


def default_features(dataset: DatasetTable) -> list[str]:
    features = [c["name"] for c in dataset.columns if c["dtype"] in NUMERIC_DTYPES and c["name"] != dataset.key_column]
    if not features:
        raise InvalidInput(f"dataset {dataset.id!r} has no numeric columns to train on")
    return features


def null_counts(path: Any, columns: list[str]) -> dict[str, int]:
    """Nulls per column, from the Parquet footer statistics when present."""
    parquet = pq.ParquetFile(path)
    schema_names = parquet.schema_arrow.names
    counts = dict.fromkeys(columns, 0)
    for group in range(parquet.num_row_groups):
        metadata = parquet.metadata.row_group(group)
        for name in columns:
            stats = metadata.column(schema_names.index(name)).statistics
            if stats is None or not stats.has_null_count:
                return {name: int(parquet.read(columns=[name]).column(0).null_count) for name in columns}
            counts[name] += int(stats.null_count)
    return counts


def ignored_hyperparameters(backend: str, hyperparameters: dict[str, Any]) -> list[str]:
    """The stored hyperparameters ``backend`` does not use: SageMaker's own keys locally (the engine
    has no use for them), ``seed`` on SageMaker (which has none; it is not sent)."""
    if backend == "sagemaker":
        return ["seed"] if hyperparameters.get("seed") is not None else []
    return sorted(name for name in hyperparameters if name in SAGEMAKER_CONTAINER_PARAMETERS)


def job_view(row: TrainingJobTable) -> TrainingJob:
    total = row.points_total or 0
    processed = min(row.points_processed or 0, total) if total else row.points_processed or 0
    return TrainingJob(
        name=row.name,
        backend=cast(BackendName, row.backend),  # the column only ever holds a registered backend's name
        status=JobStatus(row.status),
        secondary_status=row.secondary_status,
        status_message=row.status_message,
        status_transitions=[StatusTransition.model_validate(entry) for entry in row.status_transitions],
        failure_reason=row.failure_reason,
        train_dataset_id=row.train_dataset_id,
        test_dataset_id=row.test_dataset_id,
        feature_columns=row.feature_columns,
        hyperparameters=row.hyperparameters,
        ignored_hyperparameters=ignored_hyperparameters(row.backend, row.hyperparameters),
        resource_config=row.resource_config,
        ignored_options=ignored_options(row.backend, row.resource_config or {}),
        progress=Progress(
            points_processed=processed,
            points_total=total,
            percent=round(100.0 * processed / total, 2) if total else 0.0,
        ),
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        training_seconds=row.training_seconds,
        billable_seconds=row.billable_seconds,
        spot_savings_percent=spot_savings_percent(row),
        attempts=row.attempts,
        model_id=row.model_id,
        remote=row.remote,
    )
