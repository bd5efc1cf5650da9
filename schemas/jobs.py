"""Request and response models of training jobs."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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


# --- job options: where and how a SageMaker job runs ---------------------------------------------

#: SageMaker's longest runtime (28 days), the ceiling of MaxRuntimeInSeconds and MaxWaitTimeInSeconds.
MAX_RUNTIME_CEILING = 28 * 24 * 3600
_KMS_KEY_ID = r"(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})"
_KMS_ARN_PREFIX = r"arn:aws[a-z-]*:kms:[a-z]{2}(?:-[a-z]+)+-[0-9]:[0-9]{12}:"
_KMS_ALIAS = r"alias/[a-zA-Z0-9/_-]{1,250}"
#: ``ResourceConfig.VolumeKmsKeyId``: a key id or a key ARN (SageMaker's documented formats).
VOLUME_KMS_KEY_PATTERN = rf"(?:{_KMS_KEY_ID}|{_KMS_ARN_PREFIX}key/{_KMS_KEY_ID})"
#: ``OutputDataConfig.KmsKeyId``: a key id, key ARN, alias name or alias ARN.
OUTPUT_KMS_KEY_PATTERN = rf"(?:{_KMS_KEY_ID}|{_KMS_ALIAS}|{_KMS_ARN_PREFIX}(?:key/{_KMS_KEY_ID}|{_KMS_ALIAS}))"
SECURITY_GROUP_PATTERN = r"sg-[0-9a-f]{8}(?:[0-9a-f]{9})?"
SUBNET_PATTERN = r"subnet-[0-9a-f]{8}(?:[0-9a-f]{9})?"
#: ``CheckpointConfig.S3Uri``: ``s3://`` (or ``https://``) with a valid bucket name and a printable key prefix.
CHECKPOINT_URI_PATTERN = r"(?:s3|https)://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](?:/[!-~]*)?"


def _formatted(pattern: str, meaning: str) -> AfterValidator:
    """A validator that refuses a value not matching ``pattern`` (whole), saying what it must be."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if compiled.fullmatch(value) is None:
            raise ValueError(f"must be {meaning}")
        return value

    return AfterValidator(check)


def _schema_pattern(pattern: str) -> dict[str, Any]:
    return {"pattern": f"^{pattern}$"}


VolumeKmsKeyId = Annotated[
    str,
    Field(min_length=1, max_length=2048, json_schema_extra=_schema_pattern(VOLUME_KMS_KEY_PATTERN)),
    _formatted(
        VOLUME_KMS_KEY_PATTERN,
        "a KMS key id (1234abcd-12ab-34cd-56ef-1234567890ab, or mrk-... for a multi-Region key) or a key ARN "
        "(arn:aws:kms:<region>:<account>:key/<key id>)",
    ),
]
OutputKmsKeyId = Annotated[
    str,
    Field(min_length=1, max_length=2048, json_schema_extra=_schema_pattern(OUTPUT_KMS_KEY_PATTERN)),
    _formatted(
        OUTPUT_KMS_KEY_PATTERN,
        "a KMS key id, a key ARN (arn:aws:kms:<region>:<account>:key/<key id>), an alias name (alias/<name>) or "
        "an alias ARN (arn:aws:kms:<region>:<account>:alias/<name>)",
    ),
]
SecurityGroupId = Annotated[
    str,
    Field(min_length=11, max_length=20, json_schema_extra=_schema_pattern(SECURITY_GROUP_PATTERN)),
    _formatted(SECURITY_GROUP_PATTERN, "a VPC security group id: sg- and 8 or 17 lowercase hex digits"),
]
SubnetId = Annotated[
    str,
    Field(min_length=15, max_length=24, json_schema_extra=_schema_pattern(SUBNET_PATTERN)),
    _formatted(SUBNET_PATTERN, "a VPC subnet id: subnet- and 8 or 17 lowercase hex digits"),
]
CheckpointUri = Annotated[
    str,
    Field(min_length=8, max_length=1024, json_schema_extra=_schema_pattern(CHECKPOINT_URI_PATTERN)),
    _formatted(CHECKPOINT_URI_PATTERN, "an S3 URI, s3://<bucket>/<prefix> (SageMaker also takes https://)"),
]
InputMode = Literal["File", "Pipe", "FastFile"]
#: Job options the `local` backend refuses (``service.jobs.service.LOCAL_REFUSED_OPTIONS`` says why).
LOCAL_BACKEND_REFUSED = ("vpc_config", "volume_kms_key_id", "output_kms_key_id")


class VpcConfig(BaseModel):
    """SageMaker's ``VpcConfig``: the training instances run in these subnets, with these security
    groups (private subnets need an S3 VPC endpoint or a NAT gateway to read the data)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"security_group_ids": ["sg-0123456789abcdef0"], "subnets": ["subnet-0123456789abcdef0"]}]
        },
    )

    security_group_ids: list[SecurityGroupId] = Field(
        min_length=1,
        max_length=5,
        description="`VpcConfig.SecurityGroupIds`: 1 to 5 security group ids.",
        examples=[["sg-0123456789abcdef0"]],
    )
    subnets: list[SubnetId] = Field(
        min_length=1,
        max_length=16,
        description="`VpcConfig.Subnets`: 1 to 16 subnet ids.",
        examples=[["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]],
    )


class ResourceConfig(BaseModel):
    """Job options: where and how a SageMaker job runs, named like the SageMaker Python SDK's
    estimator arguments and sent as SageMaker's `CreateTrainingJob` fields (each field says which).

    Formats and ranges are SageMaker's (a malformed value is a 422 naming the field); the rules
    between options are checked when the job is created, on both backends, so a job the `local`
    backend accepts is one SageMaker accepts too (400 naming the option): `input_mode` `FastFile`
    is refused (KMeans trains in File or Pipe mode); `max_wait_seconds` needs managed spot training,
    is at most 3600 (KMeans writes no checkpoints) and at least `max_runtime_seconds`;
    `volume_kms_key_id` is refused with instance types that have local NVMe storage.

    The `local` backend trains in the worker: it ignores the options about SageMaker's machines
    (instance type and count, volume size, runtime and wait limits, spot, checkpoints, input mode)
    and lists those given in the job's `ignored_options`; it refuses (400) the ones that promise
    something it cannot keep: `vpc_config` (network placement) and the KMS keys (encryption with
    your key)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"instance_type": "ml.c4.8xlarge", "instance_count": 1, "max_runtime_seconds": 3600},
                {
                    "instance_type": "ml.m5.xlarge",
                    "instance_count": 2,
                    "volume_size_gb": 50,
                    "enable_managed_spot_training": True,
                    "max_runtime_seconds": 1800,
                    "max_wait_seconds": 3600,
                    "checkpoint_s3_uri": "s3://my-bucket/checkpoints/crime-k10",
                    "input_mode": "Pipe",
                    "volume_kms_key_id": "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                    "output_kms_key_id": "alias/centroid-models",
                    "vpc_config": {
                        "security_group_ids": ["sg-0123456789abcdef0"],
                        "subnets": ["subnet-0123456789abcdef0"],
                    },
                },
            ],
            # `max_wait_seconds` is for managed spot training only (400 otherwise).
            "if": {
                "required": ["enable_managed_spot_training"],
                "properties": {"enable_managed_spot_training": {"const": True}},
            },
            "else": {"properties": {"max_wait_seconds": {"type": "null"}}},
        },
    )

    instance_type: str | None = Field(
        default=None,
        max_length=64,
        description="`ResourceConfig.InstanceType`; default `CENTROID_TRAINING_INSTANCE_TYPE`.",
        examples=["ml.c4.8xlarge"],
    )
    instance_count: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="`ResourceConfig.InstanceCount`; default `CENTROID_TRAINING_INSTANCE_COUNT`. The training data is "
        "written as one S3 object per instance (the `train` channel is `ShardedByS3Key`); with fewer training rows "
        "than instances, only as many instances as rows are asked for (the job's `remote.instance_count` and its "
        "status message say so).",
        examples=[1],
    )
    volume_size_gb: int | None = Field(
        default=None,
        ge=1,
        le=16384,
        description="`ResourceConfig.VolumeSizeInGB`: the EBS volume of each instance, in GB (File mode copies the "
        "data there); default `CENTROID_TRAINING_VOLUME_GB` (30).",
        examples=[50],
    )
    volume_kms_key_id: VolumeKmsKeyId | None = Field(
        default=None,
        description="`ResourceConfig.VolumeKmsKeyId`: the KMS key that encrypts the instances' volumes; a key id or "
        "key ARN. Not with instance types that have local NVMe storage (SageMaker refuses it there).",
        examples=["arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"],
    )
    output_kms_key_id: OutputKmsKeyId | None = Field(
        default=None,
        description="`OutputDataConfig.KmsKeyId`: the KMS key SageMaker encrypts the model artifact with; a key id, "
        "key ARN, alias name or alias ARN. Centroid's credentials need `kms:Decrypt` on it to read the model.",
        examples=["alias/centroid-models"],
    )
    max_runtime_seconds: int | None = Field(
        default=None,
        ge=60,
        le=MAX_RUNTIME_CEILING,
        description="`StoppingCondition.MaxRuntimeInSeconds`; default `CENTROID_MAX_RUNTIME_SECONDS` (with managed "
        "spot training: at most `max_wait_seconds`).",
        examples=[3600],
    )
    enable_managed_spot_training: bool = Field(
        default=False,
        description="`EnableManagedSpotTraining`: train on Spot capacity (SageMaker bills less; the job's "
        "`spot_savings_percent` says how much). SageMaker restarts an interrupted KMeans job from the start.",
        examples=[True],
    )
    max_wait_seconds: int | None = Field(
        default=None,
        ge=60,
        le=MAX_RUNTIME_CEILING,
        description="`StoppingCondition.MaxWaitTimeInSeconds`: the longest wait for Spot capacity plus training; only "
        "with `enable_managed_spot_training`, at least `max_runtime_seconds`, and at most 3600 for KMeans (a built-in "
        "algorithm without checkpoints); default 3600 with managed spot training.",
        examples=[3600],
    )
    checkpoint_s3_uri: CheckpointUri | None = Field(
        default=None,
        description="`CheckpointConfig.S3Uri`: where SageMaker syncs `/opt/ml/checkpoints`. Sent as given; "
        "SageMaker's KMeans writes no checkpoints, so it resumes nothing.",
        examples=["s3://my-bucket/checkpoints/crime-k10"],
    )
    vpc_config: VpcConfig | None = Field(
        default=None, description="`VpcConfig`: run the training instances in your VPC."
    )
    input_mode: InputMode | None = Field(
        default=None,
        description="`AlgorithmSpecification.TrainingInputMode`: `File` (default: the data is copied to the volume "
        "first) or `Pipe` (streamed from S3; SageMaker's KMeans reads CSV, which Centroid writes, and "
        "recordIO-protobuf in both modes). `FastFile` is refused: KMeans supports File and Pipe only.",
        examples=["Pipe"],
        json_schema_extra={"not": {"const": "FastFile"}},
    )


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
            ],
            # The `local` backend refuses the options it cannot honour (400 naming them): network placement
            # and encryption with the caller's KMS keys are for `backend: sagemaker` only.
            "if": {"required": ["backend"], "properties": {"backend": {"const": "sagemaker"}}},
            "else": {
                "properties": {
                    "resource_config": {"properties": {option: {"type": "null"} for option in LOCAL_BACKEND_REFUSED}}
                }
            },
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
    resource_config: ResourceConfig = Field(
        default_factory=ResourceConfig,
        description="Job options: instance type and count, volume size and KMS keys, runtime and spot limits, VPC, "
        "input mode (SageMaker's; see the schema for what the `local` backend does with each).",
    )


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
    resource_config: dict[str, Any] = Field(
        description="The job options as given, with the defaults of managed spot training filled in "
        "(`max_wait_seconds`, `max_runtime_seconds`)."
    )
    ignored_options: list[str] = Field(
        description="Job options (keys of `resource_config`) given to the job that its backend does not use: on "
        "`local`, every option about SageMaker's machines (`instance_type`, `instance_count`, `volume_size_gb`, "
        "`max_runtime_seconds`, `enable_managed_spot_training`, `max_wait_seconds`, `checkpoint_s3_uri`, "
        "`input_mode`); on `sagemaker`, none. Sorted; empty when every one is used.",
        examples=[["instance_count", "instance_type"]],
    )
    progress: Progress
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    training_seconds: float | None = Field(description="Time spent training.")
    billable_seconds: float | None = Field(
        description="Billable time (SageMaker's `BillableTimeInSeconds`, per instance; local: the time the worker "
        "spent)."
    )
    spot_savings_percent: float | None = Field(
        description="What managed spot training saved, as SageMaker's console shows it: "
        "(1 - BillableTimeInSeconds / TrainingTimeInSeconds) x 100, rounded to 0.01. Null unless the job ran on "
        "SageMaker with `enable_managed_spot_training` and SageMaker reported both times.",
        examples=[70.0],
    )
    attempts: int = Field(description="How many times a worker started this job (>1 after a crash).")
    model_id: str | None = Field(description="The model registered when the job completed.")
    remote: dict[str, Any] = Field(description="Backend-specific identifiers (e.g. the SageMaker job ARN).")
