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
        default=100 * MIB, ge=1, description="Largest accepted request body, in bytes (413 above)."
    )
    max_columns: int = Field(default=10_000, ge=1, description="Most columns a dataset may have.")
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
    log_format: Literal["json", "text"] = Field(default="json", description="Log line format.")

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
    def resolved_artifact_dir(self) -> Path:
        """The artifact directory actually used."""
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once from the environment (tests build their own ``Settings``)."""
    return Settings()
