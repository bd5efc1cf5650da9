"""Request and response models of training jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.statuses import JobStatus

BackendName = Literal["local", "sagemaker"]
ResourceName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$",
        description="Client-chosen unique name (SageMaker's rules: letters, digits, hyphens; max 63).",
    ),
]
Scalar = int | float | str


class Hyperparameters(BaseModel):
    """SageMaker KMeans hyperparameters (names, ranges and defaults as SageMaker documents them).

    Values may be given as strings, as SageMaker sends them. Validation errors (400) name the
    parameter and its valid range. Integers are at most 2^63 - 1, and the service's ceilings
    (settings `CENTROID_MAX_*`, defaults below) bound what one job may cost.

    A `HyperParameters` map copied from SageMaker (`DescribeTrainingJob` of a job the SageMaker
    Python SDK launched) is accepted as it is: besides the names below it may hold `force_dense`
    (`true`/`false`, any case) and the KMeans container's own settings `_num_gpus` (integer >= 0 or
    `auto`), `_num_kv_servers` (integer >= 1 or `auto`), `_num_slices` (integer >= 1),
    `_enable_profiler`, `_disable_wait_to_read` (`true`/`false`), `_kvstore`, `_log_level`,
    `_tuning_objective_metric` (text). The `sagemaker` backend sends them to SageMaker unchanged;
    the `local` backend ignores them and lists them in the job's `ignored_hyperparameters`. Any
    other name is refused (400, `unknown hyperparameter`)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"k": 10, "mini_batch_size": 500, "init_method": "kmeans++", "seed": 42},
                {
                    "k": "10",
                    "feature_dim": "5",
                    "mini_batch_size": "500",
                    "eval_metrics": '["msd", "ssd"]',
                    "force_dense": "True",
                    "_num_gpus": "auto",
                    "_kvstore": "auto",
                    "_log_level": "info",
                    "_num_slices": "1",
                    "_num_kv_servers": "1",
                    "_enable_profiler": "false",
                    "_tuning_objective_metric": "",
                    "_disable_wait_to_read": "false",
                },
            ]
        },
    )

    k: int | str = Field(
        description="Number of clusters, int >= 2 (required); at most `CENTROID_MAX_K` (10000), and k x feature_dim "
        "at most `CENTROID_MAX_CENTROID_VALUES`.",
        examples=[10],
    )
    feature_dim: int | str | None = Field(
        default=None, description="Number of features; default: the number of feature columns.", examples=[5]
    )
    mini_batch_size: int | str | None = Field(
        default=None,
        description="Rows per mini-batch, >= 1 (default 5000); at most `CENTROID_MAX_MINI_BATCH_SIZE` (1000000).",
    )
    epochs: int | str | None = Field(
        default=None, description="Passes over the data, >= 1 (default 1); at most `CENTROID_MAX_EPOCHS` (10000)."
    )
    init_method: str | None = Field(default=None, description="`random` (default) or `kmeans++`.")
    extra_center_factor: int | str | None = Field(
        default=None,
        description="Centers kept during streaming = k x this; int >= 1 or `auto` (10); at most "
        "`CENTROID_MAX_EXTRA_CENTER_FACTOR` (100).",
    )
    local_lloyd_max_iter: int | str | None = Field(
        default=None,
        description="Lloyd iterations per trial, >= 1 (default 300); at most `CENTROID_MAX_LLOYD_ITERATIONS` (10000).",
    )
    local_lloyd_tol: float | str | None = Field(default=None, description="Lloyd tolerance in [0, 1] (default 1e-4).")
    local_lloyd_init_method: str | None = Field(default=None, description="`kmeans++` (default) or `random`.")
    local_lloyd_num_trials: int | str | None = Field(
        default=None,
        description="Lloyd restarts, best kept; int >= 1 or `auto` (10); at most `CENTROID_MAX_LLOYD_TRIALS` (100).",
    )
    half_life_time_size: int | str | None = Field(
        default=None, description="Points after which a center's weight halves; 0 = no decay (default)."
    )
    eval_metrics: list[str] | str | None = Field(
        default=None,
        description='Subset of ["msd", "ssd"] (default ["msd"]), a list or SageMaker\'s JSON string '
        '(`\'["msd", "ssd"]\'`): which of `test:msd` / `test:ssd` (with a test dataset) and '
        "`train:msd_full_pass` / `train:ssd_full_pass` the model reports; `train:msd` is always reported.",
    )
    seed: int | str | None = Field(
        default=None, description="Centroid extension: same seed and data give identical centroids."
    )


class ResourceConfig(BaseModel):
    """Where a SageMaker job runs (ignored by the local backend)."""

    instance_type: str | None = Field(default=None, description="Default from settings.", examples=["ml.c4.8xlarge"])
    instance_count: int | None = Field(default=None, ge=1, le=100, examples=[1])
    max_runtime_seconds: int | None = Field(default=None, ge=60, le=28 * 24 * 3600, examples=[3600])


class TrainingJobCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "workshop-k10",
                    "train_dataset_id": "ds-6f1c0e9b2a4d4f3e8b1a",
                    "hyperparameters": {"k": 10, "init_method": "kmeans++", "seed": 1},
                    "backend": "local",
                }
            ]
        }
    )

    name: ResourceName
    train_dataset_id: str = Field(min_length=1, max_length=40, description="Dataset to train on.")
    test_dataset_id: str | None = Field(
        default=None, max_length=40, description="Optional dataset for test msd/ssd (same feature columns)."
    )
    feature_columns: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        min_length=1,
        description="Numeric columns to cluster on; default: every numeric column except the key.",
        examples=[["Murder", "Assault", "UrbanPop", "Rape", "DensityPerMile"]],
    )
    hyperparameters: Hyperparameters
    backend: BackendName = Field(default="local", description="`local` (in-process) or `sagemaker`.")
    resource_config: ResourceConfig = Field(default_factory=ResourceConfig)


class StatusTransition(BaseModel):
    status: str = Field(description="Secondary status.", examples=["Training"])
    start_time: datetime
    end_time: datetime | None = None
    message: str | None = None


class Progress(BaseModel):
    points_processed: int = Field(description="Training points processed so far.", examples=[250])
    points_total: int = Field(description="Points the training will process (rows x epochs).", examples=[500])
    percent: float = Field(description="points_processed / points_total, in percent.", examples=[50.0])


class TrainingJob(BaseModel):
    """A training job's state, mirroring SageMaker's DescribeTrainingJob."""

    name: str = Field(examples=["workshop-k10"])
    backend: BackendName
    status: JobStatus
    secondary_status: str = Field(description="Finer-grained status (Starting, Training, ...).", examples=["Training"])
    status_message: str | None = Field(description="What is happening now.")
    status_transitions: list[StatusTransition] = Field(description="History of secondary statuses.")
    failure_reason: str | None
    train_dataset_id: str
    test_dataset_id: str | None
    feature_columns: list[str]
    hyperparameters: dict[str, Any] = Field(
        description="Resolved hyperparameters, defaults filled in; SageMaker-only keys as they were given."
    )
    ignored_hyperparameters: list[str] = Field(
        description="Hyperparameters given to the job that its backend does not use: on `local`, the SageMaker-only "
        "keys (`force_dense` and the container's `_num_gpus`, `_kvstore`, ...); on `sagemaker`, `seed` (SageMaker "
        "has none). Sorted; empty when every one is used.",
        examples=[["_kvstore", "_num_gpus", "force_dense"]],
    )
    resource_config: dict[str, Any]
    progress: Progress
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    training_seconds: float | None = Field(description="Time spent training.")
    billable_seconds: float | None = Field(description="Billable time (local: the time the worker spent).")
    attempts: int = Field(description="How many times a worker started this job (>1 after a crash).")
    model_id: str | None = Field(description="The model registered when the job completed.")
    remote: dict[str, Any] = Field(description="Backend-specific identifiers (e.g. the SageMaker job ARN).")
