"""Configuration: the only module that reads the environment.

Every setting can be given as an environment variable with the ``CENTROID_`` prefix
(``CENTROID_DATABASE_URL``, ``CENTROID_MAX_UPLOAD_BYTES``, ...).  ``DATABASE_URL`` without the
prefix is accepted too, because that is what hosting platforms and docker images set.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class ApiKeyEntry(BaseModel):
    """One API key as configured: only its SHA-256 is stored, never the key itself."""

    name: str = Field(min_length=1, max_length=100, description="Who or what uses the key (for logs).")
    scope: Literal["read", "admin"] = Field(description="`read`: GET and predictions; `admin`: everything.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the key (`centroid keys create`).")


class Settings(BaseSettings):
    """Centroid's settings, with defaults for the embedded single-machine mode."""

    model_config = SettingsConfigDict(env_prefix="CENTROID_", extra="ignore")

    data_dir: Path = Field(
        default=Path("centroid-data"),
        description="Directory for the default SQLite database and artifacts; created on start.",
    )
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CENTROID_DATABASE_URL", "DATABASE_URL", "database_url"),
        description="SQLAlchemy URL. Default: a SQLite file `centroid.db` inside `data_dir`.",
    )
    artifact_dir: Path | None = Field(
        default=None, description="Where dataset Parquet files and models live. Default: data_dir/artifacts."
    )
    max_upload_bytes: int = Field(
        default=100 * MIB,
        ge=1,
        description="Largest accepted request body, in bytes (413 above), except CSV uploads to `POST /datasets`.",
    )
    max_csv_upload_bytes: int = Field(
        default=10 * 1024 * MIB,
        ge=1,
        description="Largest CSV upload to `POST /datasets` (multipart or `text/csv`), in bytes (413 above). "
        "It is streamed to a file in the artifact directory, never held in memory; an upload the free disk "
        "cannot hold (twice its size: the CSV and its Parquet file) is refused at once with 507.",
    )
    max_columns: int = Field(default=10_000, ge=1, description="Most columns a dataset may have.")
    derive_memory_mb: int = Field(
        default=256,
        ge=16,
        description="Memory, in MiB, the columnar engine (DuckDB) may use for one derive; beyond it, it spills to "
        "files under the artifact directory's `work/` folder. Also the most a join may hold in arrays of row "
        "positions and of the other side's columns (one at a time); a join that would need more is done by "
        "DuckDB's hash join instead (same result, slower).",
    )
    # Ceilings on a derived dataset's recipe (a DAG of the datasets it reads, each stored once); a
    # derive above one is refused with 400 before any data is read.
    max_recipe_depth: int = Field(
        default=32,
        ge=1,
        le=200,
        description="Longest chain of derives from an upload to a derived dataset (an upload is depth 0).",
    )
    max_recipe_datasets: int = Field(
        default=256, ge=1, description="Most distinct datasets in one recipe (the dataset itself included)."
    )
    max_recipe_steps: int = Field(
        default=1_000, ge=1, description="Most steps in one recipe, over all the datasets it includes."
    )
    max_recipe_bytes: int = Field(
        default=8 * MIB, ge=1024, description="Largest recipe, in bytes of JSON, a derived dataset may store."
    )
    parquet_row_group_rows: int = Field(
        default=65_536, ge=1, description="Rows per Parquet row group (the unit training streams)."
    )
    orphan_grace_seconds: float = Field(
        default=600.0,
        ge=0,
        description="Age after which an artifact file with no database row is swept at start-up.",
    )
    max_invocation_rows: int = Field(
        default=100_000, ge=1, description="Most rows one invocation or prediction request may carry (413 above)."
    )
    max_model_bytes: int = Field(
        default=64 * MIB,
        ge=1,
        description="Most bytes an imported model.tar.gz may decompress to; more (a gzip bomb, a member claiming "
        "gigabytes) is refused while streaming, before anything that size is held in memory.",
    )
    max_k: int = Field(
        default=10_000,
        ge=2,
        description="Most clusters (centroids) a model may have: an import with more is refused (400) from the "
        "archive's header, before the centroids are read; training jobs asking for more are refused too.",
    )
    max_centroid_values: int = Field(
        default=1_000_000,
        ge=2,
        description="Most centroid coordinates (k x feature_dim) a model may have: bounds the model row, the "
        "`/centroids` response and the memory serving it takes. Imports (and training jobs) above are refused.",
    )
    max_local_centers: int = Field(
        default=10_000,
        ge=100,
        description="Most local centers a training may keep (k x extra_center_factor, `auto` = 10). The k-means++ "
        "seeding over them is one call that cannot be interrupted and grows with their square: this ceiling bounds "
        "how long a stop can wait for it (about 2 s at 10,000 on 2 cores).",
    )
    max_distance_cells: int = Field(
        default=1_000_000,
        ge=1,
        description="Most distances (rows x k) one prediction with `include_distances` may return; more gets 413.",
    )
    serving_refresh_seconds: float = Field(
        default=0.25,
        gt=0,
        le=0.9,
        description="How often each API process checks whether endpoints changed (a switch, a delete) in another "
        "process. Changes made through this process apply at once; elsewhere within this interval plus one reload, "
        "under 1 second.",
    )
    embedded_worker: bool = Field(
        default=True, description="Run a background worker inside the API process (`centroid serve`)."
    )
    worker_poll_interval: float = Field(
        default=1.0, gt=0, description="Seconds an idle worker waits before looking for work again."
    )
    lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How long a claimed job stays a worker's without a heartbeat; after that another worker takes it.",
    )
    # Ceilings on what one training job may ask for (SageMaker documents no upper bounds; its
    # defaults and tuning ranges are far below these). A job above one is refused with 400.
    max_epochs: int = Field(
        default=10_000, ge=1, le=2**63 - 1, description="Most passes over the data (`epochs`) a job may ask for."
    )
    max_mini_batch_size: int = Field(
        default=1_000_000,
        ge=5_000,
        le=2**63 - 1,
        description="Largest `mini_batch_size` (rows held in memory at once while training).",
    )
    max_extra_center_factor: int = Field(
        default=100,
        ge=10,
        le=2**63 - 1,
        description="Largest `extra_center_factor` (k x this local centers are streamed over and reduced).",
    )
    max_lloyd_trials: int = Field(
        default=100,
        ge=10,
        le=2**63 - 1,
        description="Largest `local_lloyd_num_trials` (Lloyd restarts of the reduction).",
    )
    max_lloyd_iterations: int = Field(
        default=10_000,
        ge=300,
        le=2**63 - 1,
        description="Largest `local_lloyd_max_iter` (Lloyd iterations per reduction trial).",
    )
    worker_expiry_seconds: float | None = Field(
        default=None,
        gt=0,
        description="A worker whose heartbeat is older than this is dead: live workers delete its row and "
        "/metrics stops counting it. Default: 3 x max(lease_seconds, worker_poll_interval).",
    )
    event_poll_seconds: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="How often an events stream (`GET /training-jobs/{name}/events`, `/sweeps/{name}/events`) re-reads "
        "its resource to push a change.",
    )
    event_stream_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="Most seconds one events stream stays open; it then ends with `event: timeout` (a client "
        "reconnects to go on).",
    )
    max_event_streams: int = Field(
        default=100, ge=1, description="Most events streams one API process holds open at once; more get 503."
    )
    remote_poll_seconds: float = Field(
        default=15.0, gt=0, description="Seconds between status polls of remote (SageMaker) jobs and endpoints."
    )
    aws_region: str | None = Field(
        default=None,
        description="AWS region for SageMaker and S3 (e.g. `us-east-1`); it also picks the KMeans image.",
    )
    sagemaker_role_arn: str | None = Field(
        default=None,
        description="IAM role SageMaker assumes to read the data and write the model (execution role).",
    )
    s3_bucket: str | None = Field(default=None, description="S3 bucket for training data and model artifacts.")
    s3_prefix: str = Field(
        default="centroid", description="Key prefix inside `s3_bucket` for everything Centroid writes."
    )
    training_instance_type: str = Field(
        default="ml.c4.8xlarge", description="Default SageMaker training instance type (per job: resource_config)."
    )
    training_instance_count: int = Field(
        default=1, ge=1, description="Default number of training instances (the data is sharded across them)."
    )
    sweep_parallel_training_jobs: int = Field(
        default=4,
        ge=1,
        le=100,
        description="On the sagemaker backend a sweep runs one training job per k: at most this many at once "
        "(SageMaker's per-account quota of concurrent training jobs applies; each job is billed).",
    )
    training_volume_gb: int = Field(
        default=30, ge=1, description="EBS volume per training instance, in GB (holds the downloaded data)."
    )
    endpoint_instance_type: str = Field(
        default="ml.m4.xlarge", description="Default SageMaker endpoint instance type (per endpoint: instance_type)."
    )
    endpoint_instance_count: int = Field(default=1, ge=1, description="Default number of endpoint instances.")
    max_runtime_seconds: int = Field(
        default=86_400, ge=60, description="Default SageMaker StoppingCondition.MaxRuntimeInSeconds of a training job."
    )
    aws_endpoint_url: str | None = Field(
        default=None,
        description="Send every AWS call to this URL instead of AWS (a moto server in tests or docker-compose).",
    )
    aws_max_attempts: int = Field(
        default=8, ge=1, description="Attempts per AWS call; throttling and transient errors are retried with backoff."
    )
    api_keys: list[ApiKeyEntry] = Field(
        default_factory=list,
        description="API keys as a JSON list of {name, scope, sha256}. Empty: the API is open and "
        "`centroid serve` only listens on 127.0.0.1.",
    )
    log_level: str = Field(default="INFO", description="Python logging level name.")
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="Log line format: `json` (one object per line, with the request id), `text` (readable lines), "
        "or `auto`: text when stderr is a terminal (a person watching), JSON otherwise (a file, a pipe, a "
        "container's log collector).",
    )
    # HTTP connection bounds of `centroid serve` (service/http_limits.py).
    max_header_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description="Most bytes of a request line plus headers; more gets 431 and the connection is closed.",
    )
    header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A request's headers must be complete this long after its first byte (after the connection "
        "opened, for the first request); otherwise 408 and the connection is closed.",
    )
    body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A request's body must be complete this long after its headers, plus one second per "
        "`body_min_bytes_per_second` bytes received; otherwise 408 and the connection is closed.",
    )
    body_min_bytes_per_second: int = Field(
        default=10 * 1024,
        ge=0,
        description="The body rate that extends `body_timeout_seconds` (one second per this many bytes); "
        "0: the whole body must arrive within `body_timeout_seconds`.",
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}:
            raise ValueError(f"unknown log level {value!r}")
        return level

    @property
    def resolved_database_url(self) -> str:
        """The database URL actually used (the SQLite default lives in ``data_dir``)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'centroid.db').resolve()}"

    @property
    def resolved_worker_expiry_seconds(self) -> float:
        """How old a worker's heartbeat may get before the worker counts as dead."""
        return self.worker_expiry_seconds or 3 * max(self.lease_seconds, self.worker_poll_interval)

    @property
    def resolved_artifact_dir(self) -> Path:
        """The artifact directory actually used."""
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once from the environment (tests build their own ``Settings``)."""
    return Settings()
