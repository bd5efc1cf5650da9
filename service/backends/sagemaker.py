"""Amazon SageMaker backend: built-in KMeans training jobs and real-time endpoints through boto3.

The worker drives it in short, resumable steps (see :mod:`service.backends.base`):

* training: the first call streams the feature matrix from Parquet to S3 as headerless CSV and
  calls CreateTrainingJob; later calls poll DescribeTrainingJob and mirror it. On Completed the
  model artifact is downloaded and read with the engine's reader, so the model is registered like
  a local one (and can be served locally).
* endpoints: the model's ``model.tar.gz`` is put in S3, then CreateModel, CreateEndpointConfig and
  CreateEndpoint (UpdateEndpoint for a switch); DescribeEndpoint is polled until InService.
* invocations go through ``sagemaker-runtime`` InvokeEndpoint (CSV in, JSON out).

Every name is derived from the job, endpoint and model, and everything the next call needs is
returned in ``remote`` (stored by the worker), so a worker may die between any two calls.
Errors are sorted in two kinds: transient ones (throttling, 5xx, network, credentials that may be
refreshed) raise, and the worker retries later; permanent ones (missing bucket, access denied,
validation errors, unusable artifacts) end the job ``Failed`` with a reason that says what to fix.
This module is the only one that imports boto3; credentials come from boto3's standard chain and
never appear in logs, statuses or errors.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from service.backends.base import (
    BackendNotConfigured,
    BackendStatus,
    DatasetInput,
    EndpointSpec,
    EndpointUpdate,
    TrainedModel,
    TrainingHooks,
    TrainingSpec,
    TrainingUpdate,
)
from service.engine import ModelFormatError, Prediction, read_model_tar
from service.errors import InvalidInput, ServiceUnavailable
from service.settings import Settings

log = logging.getLogger("centroid.sagemaker")

NAME = "sagemaker"
TRAIN_CONTENT_TYPE = "text/csv;label_size=0"
FIRST_POLL_SECONDS = 2.0
MAX_STOP_ATTEMPTS = 5
MAX_ARTIFACT_BYTES = 1 << 30
PART_BYTES = 8 * 1024 * 1024  # S3 multipart part size (S3's minimum is 5 MiB)
READ_BATCH_ROWS = 65_536
INVOKE_MAX_BYTES = 5_000_000  # InvokeEndpoint accepts 6 MB payloads; stay below
VARIANT = "AllTraffic"
ENDPOINT_BUSY = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")
MAX_NAME = 63
STEM_MAX = 38  # 38 + "-" + a 24-character model id = 63

_TRANSIENT_CODES = {
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "InternalFailure",
    "InternalError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    # credentials can be refreshed or fixed without touching the job: retry rather than fail
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
}


class _Permanent(Exception):
    """A problem no retry will fix; its message becomes the job's or endpoint's failure reason."""


# --- small helpers ----------------------------------------------------------------------------


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _message(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', 'Error')}: {error.get('Message', '')}".rstrip(": ")


def _http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _is_transient(exc: ClientError) -> bool:
    return _http_status(exc) >= 500 or _code(exc) in _TRANSIENT_CODES


def _is_not_found(exc: ClientError) -> bool:
    """SageMaker says "not found" with a ValidationException; S3 with 404/NoSuchKey/NoSuchBucket."""
    text = str(exc.response.get("Error", {}).get("Message", "")).lower()
    return (
        _code(exc) in ("NoSuchKey", "NoSuchBucket", "404", "NotFound", "ResourceNotFound")
        or _http_status(exc) == 404
        or (_code(exc) == "ValidationException" and ("could not find" in text or "not found" in text))
    )


def _s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _split_s3_uri(uri: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([^/]+)/(.+)", uri)
    if match is None:
        raise _Permanent(f"SageMaker reported a model artifact location that is not an S3 URI: {uri!r}")
    return match.group(1), match.group(2)


def _without_userinfo(url: str | None) -> str | None:
    """An endpoint URL fit for display: any ``user:password@`` part removed."""
    if not url:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _iso(value: Any) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _name_stem(endpoint: str) -> str:
    """The start of every config/model name of ``endpoint``: the name itself, or for long names a
    cut plus a hash, so ``<stem>-<model id>`` stays within SageMaker's 63 characters."""
    if len(endpoint) <= STEM_MAX:
        return endpoint
    digest = hashlib.sha1(endpoint.encode()).hexdigest()[:8]
    return f"{endpoint[: STEM_MAX - len(digest) - 1].rstrip('-')}-{digest}"


def _derived_name(endpoint: str, model_id: str) -> str:
    """Model and endpoint-config name for ``model_id`` on ``endpoint`` (the same for both)."""
    suffix = re.sub(r"[^A-Za-z0-9-]", "-", model_id).strip("-")
    return f"{_name_stem(endpoint)}-{suffix}"[:MAX_NAME].rstrip("-")


_SESSION_LOCK = threading.Lock()  # boto3 sessions are not thread-safe while creating clients


@lru_cache(maxsize=1)
def _session() -> boto3.session.Session:
    """One session per process, like boto3's default session: building one parses the service
    models again, and it resolves (and refreshes) credentials through the standard chain."""
    return boto3.session.Session()


@lru_cache(maxsize=16)
def kmeans_image(region: str) -> str:
    """The built-in KMeans image for ``region``, from the SageMaker SDK's image catalogue (offline)."""
    from sagemaker.core import image_uris  # imported lazily: it takes a second to import

    try:
        return str(image_uris.retrieve("kmeans", region))
    except ValueError as exc:
        raise _Permanent(f"SageMaker has no KMeans image for region {region!r}: {exc}") from exc


def _failed(reason: str, **remote: Any) -> TrainingUpdate:
    return TrainingUpdate(status="Failed", secondary_status="Failed", failure_reason=reason, remote=remote)


def _metric_name(name: str) -> str:
    """SageMaker's ``train:msd`` becomes ``train_msd`` like the local engine's metrics."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _transitions(described: dict[str, Any]) -> list[dict[str, Any]] | None:
    entries = described.get("SecondaryStatusTransitions") or []
    return [
        {
            "status": entry.get("Status"),
            "start_time": _iso(entry.get("StartTime")),
            "end_time": _iso(entry.get("EndTime")),
            "message": entry.get("StatusMessage"),
        }
        for entry in entries
    ] or None


class _MultipartWriter:
    """Stream bytes into one S3 object: a single PUT when small, a multipart upload when large."""

    def __init__(self, s3: Any, bucket: str, key: str, content_type: str) -> None:
        self.s3, self.bucket, self.key, self.content_type = s3, bucket, key, content_type
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.size = 0

    def write(self, data: bytes) -> None:
        self.buffer += data
        self.size += len(data)
        if len(self.buffer) >= PART_BYTES:
            self._flush_part()

    def _flush_part(self) -> None:
        if self.upload_id is None:
            created = self.s3.create_multipart_upload(Bucket=self.bucket, Key=self.key, ContentType=self.content_type)
            self.upload_id = created["UploadId"]
        number = len(self.parts) + 1
        part = self.s3.upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=bytes(self.buffer)
        )
        self.parts.append({"ETag": part["ETag"], "PartNumber": number})
        self.buffer.clear()

    def close(self) -> None:
        if self.upload_id is None:
            self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer), ContentType=self.content_type)
            return
        if self.buffer:
            self._flush_part()
        self.s3.complete_multipart_upload(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts}
        )

    def abort(self) -> None:
        if self.upload_id is not None:
            try:
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            except (ClientError, BotoCoreError):
                log.warning("could not abort the multipart upload of s3://%s/%s", self.bucket, self.key)


def features_csv(features: np.ndarray) -> list[bytes]:
    """Rows as CSV (shortest round-trip floats), in chunks below InvokeEndpoint's payload limit."""
    chunks: list[bytes] = []
    current: list[str] = []
    size = 0
    for row in np.asarray(features, dtype=np.float64):
        line = ",".join(repr(float(value)) for value in row) + "\n"
        if current and size + len(line) > INVOKE_MAX_BYTES:
            chunks.append("".join(current).encode())
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append("".join(current).encode())
    return chunks


def parse_predictions(body: bytes, rows: int) -> Prediction:
    """SageMaker KMeans's ``{"predictions": [{"closest_cluster", "distance_to_cluster"}, ...]}``."""
    try:
        items = json.loads(body)["predictions"]
        clusters = np.array([item["closest_cluster"] for item in items], dtype=np.float64)
        distances = np.array([item["distance_to_cluster"] for item in items], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as exc:
        raise ServiceUnavailable(f"the SageMaker endpoint returned an unreadable response: {exc!s:.200}") from exc
    if len(clusters) != rows:
        raise ServiceUnavailable(f"the SageMaker endpoint returned {len(clusters)} predictions for {rows} rows")
    return Prediction(closest_cluster=clusters.astype(np.int64), distance_to_cluster=distances)


@dataclass(frozen=True)
class _Deployment:
    """The SageMaker names serving one model on one endpoint (model and config share the name)."""

    endpoint: str
    config: str
    model: str


# --- the backend --------------------------------------------------------------------------------


class SageMakerBackend:
    """Train with SageMaker's built-in KMeans and serve on SageMaker real-time endpoints."""

    name = NAME
    trains_in_process = False

    def __init__(self, settings: Settings) -> None:
        """No network here: clients are created on first use, so an unconfigured backend costs nothing."""
        self.settings = settings
        self._clients: dict[str, Any] = {}

    # --- configuration ------------------------------------------------------------------------

    def missing_settings(self) -> list[str]:
        wanted = {
            "CENTROID_AWS_REGION": self.settings.aws_region,
            "CENTROID_SAGEMAKER_ROLE_ARN": self.settings.sagemaker_role_arn,
            "CENTROID_S3_BUCKET": self.settings.s3_bucket,
        }
        return [name for name, value in wanted.items() if not value]

    def ensure_configured(self) -> None:
        """Cheap (no network): the settings a job or endpoint needs are present."""
        missing = self.missing_settings()
        if missing:
            raise BackendNotConfigured(f"missing settings: {', '.join(missing)}")

    def status(self) -> BackendStatus:
        """Configured = settings present and the bucket reachable with the credentials in effect."""
        settings = self._public_settings()
        missing = self.missing_settings()
        if missing:
            return BackendStatus(self.name, False, f"missing settings: {', '.join(missing)}", settings)
        bucket = self.settings.s3_bucket
        try:
            self.client("s3", probe=True).head_bucket(Bucket=bucket)
        except NoCredentialsError:
            return BackendStatus(
                self.name, False, "no AWS credentials found (standard boto3 credential chain)", settings
            )
        except ClientError as exc:
            why = f"HTTP {_http_status(exc)} {_code(exc)}".strip()
            return BackendStatus(self.name, False, f"S3 bucket {bucket!r} is not reachable ({why})", settings)
        except BotoCoreError as exc:
            return BackendStatus(self.name, False, f"S3 is not reachable ({type(exc).__name__})", settings)
        return BackendStatus(
            self.name, True, f"trains and serves on Amazon SageMaker in {self.settings.aws_region}", settings
        )

    def _public_settings(self) -> dict[str, Any]:
        s = self.settings
        return {
            "region": s.aws_region,
            "role_arn": s.sagemaker_role_arn,
            "bucket": s.s3_bucket,
            "prefix": s.s3_prefix,
            "training_instance_type": s.training_instance_type,
            "training_instance_count": s.training_instance_count,
            "endpoint_instance_type": s.endpoint_instance_type,
            "endpoint_instance_count": s.endpoint_instance_count,
            "max_runtime_seconds": s.max_runtime_seconds,
            "endpoint_url": _without_userinfo(s.aws_endpoint_url),
        }

    def client(self, service: str, *, probe: bool = False) -> Any:
        """A cached boto3 client; retries throttling and transient errors ("standard" mode).

        ``probe`` clients (for status checks) give up fast so ``GET /backends`` never hangs.
        """
        key = f"{service}:probe" if probe else service
        with _SESSION_LOCK:
            if key not in self._clients:
                config = (
                    Config(retries={"mode": "standard", "total_max_attempts": 2}, connect_timeout=3, read_timeout=5)
                    if probe
                    else Config(retries={"mode": "standard", "total_max_attempts": self.settings.aws_max_attempts})
                )
                self._clients[key] = _session().client(
                    service,
                    region_name=self.settings.aws_region,
                    endpoint_url=self.settings.aws_endpoint_url,
                    config=config,
                )
            return self._clients[key]

    def _key(self, *parts: str) -> str:
        prefix = self.settings.s3_prefix.strip("/")
        return "/".join([prefix, *parts] if prefix else parts)

    @property
    def _bucket(self) -> str:
        return str(self.settings.s3_bucket)

    # --- training -----------------------------------------------------------------------------

    def advance_training(self, spec: TrainingSpec, hooks: TrainingHooks) -> TrainingUpdate:
        """Submit the job on the first call; afterwards mirror DescribeTrainingJob."""
        submitted = bool(spec.remote.get("training_job_name"))
        try:
            self.ensure_configured()
        except BackendNotConfigured as exc:
            if submitted:
                raise  # the job runs on SageMaker: keep it, poll again once the settings are back
            return _failed(f"the sagemaker backend is not configured: {exc}")
        try:
            if not submitted:
                if spec.stop_requested:
                    return TrainingUpdate(
                        status="Stopped", secondary_status="Stopped", message="stopped before submission"
                    )
                return self._submit(spec)
            return self._poll(spec)
        except _Permanent as exc:
            return _failed(str(exc))

    def _submit(self, spec: TrainingSpec) -> TrainingUpdate:
        image = kmeans_image(str(self.settings.aws_region))
        remote: dict[str, Any] = {
            "training_job_name": spec.job_name,
            "region": self.settings.aws_region,
            "output_s3_uri": _s3_uri(self._bucket, self._key(spec.job_name, "output")),
        }
        existing = self._adopt(spec.job_name, remote["output_s3_uri"])  # before uploading anything
        remote["training_job_arn"] = existing or self._create_training_job(spec, image, remote)
        log.info("submitted SageMaker training job", extra={"job": spec.job_name, "image": image})
        return TrainingUpdate(
            status="InProgress",
            secondary_status="Starting",
            message=f"submitted to SageMaker as training job {spec.job_name}",
            remote={**remote, "polls": 0},
            poll_after_seconds=self._poll_delay(0),
        )

    def _create_training_job(self, spec: TrainingSpec, image: str, remote: dict[str, Any]) -> str:
        """Upload the data, then CreateTrainingJob; returns the job's ARN."""
        instance_count = int(spec.resource_config.get("instance_count") or self.settings.training_instance_count)
        remote["train_s3_uri"], remote["train_objects"] = self._upload_dataset(
            spec, spec.train, "train", instance_count
        )
        if spec.test is not None:
            remote["test_s3_uri"], _ = self._upload_dataset(spec, spec.test, "test", 1)
        request = self._training_request(spec, image, remote, instance_count)
        try:
            return str(self.client("sagemaker").create_training_job(**request)["TrainingJobArn"])
        except ClientError as exc:
            if _code(exc) == "ResourceInUse":  # created meanwhile (another worker after a lease expiry)
                adopted = self._adopt(spec.job_name, remote["output_s3_uri"])
                if adopted is not None:
                    return adopted
            self._raise_if_transient(exc)
            raise _Permanent(f"SageMaker refused CreateTrainingJob: {_message(exc)}") from exc

    def _adopt(self, job_name: str, output_uri: str) -> str | None:
        """The ARN of an existing job by this name if it is ours (a worker died after creating it:
        same output path); a foreign job by this name fails ours; None when there is none."""
        try:
            described = self.client("sagemaker").describe_training_job(TrainingJobName=job_name)
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            self._raise_if_transient(exc)
            raise _Permanent(f"SageMaker refused DescribeTrainingJob: {_message(exc)}") from exc
        if described.get("OutputDataConfig", {}).get("S3OutputPath", "").rstrip("/") != output_uri:
            raise _Permanent(
                f"a SageMaker training job named {job_name!r} already exists in this account and region "
                "and was not started by this Centroid; choose another job name"
            )
        log.info("training job %s already exists on SageMaker; resuming it", job_name)
        return str(described["TrainingJobArn"])

    def _training_request(
        self, spec: TrainingSpec, image: str, remote: dict[str, Any], instance_count: int
    ) -> dict[str, Any]:
        hyperparameters = spec.hyperparameters.to_sagemaker()
        hyperparameters["feature_dim"] = str(len(spec.train.columns))
        channels = [self._channel("train", remote["train_s3_uri"], "ShardedByS3Key")]
        if "test_s3_uri" in remote:
            channels.append(self._channel("test", remote["test_s3_uri"], "FullyReplicated"))
        config = spec.resource_config
        return {
            "TrainingJobName": spec.job_name,
            "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": "File"},
            "RoleArn": self.settings.sagemaker_role_arn,
            "HyperParameters": hyperparameters,
            "InputDataConfig": channels,
            "OutputDataConfig": {"S3OutputPath": remote["output_s3_uri"]},
            "ResourceConfig": {
                "InstanceType": config.get("instance_type") or self.settings.training_instance_type,
                "InstanceCount": instance_count,
                "VolumeSizeInGB": self.settings.training_volume_gb,
            },
            "StoppingCondition": {
                "MaxRuntimeInSeconds": int(config.get("max_runtime_seconds") or self.settings.max_runtime_seconds)
            },
            "Tags": [{"Key": "centroid:training-job", "Value": spec.job_name}],
        }

    @staticmethod
    def _channel(name: str, uri: str, distribution: str) -> dict[str, Any]:
        return {
            "ChannelName": name,
            "DataSource": {
                "S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": distribution}
            },
            "ContentType": TRAIN_CONTENT_TYPE,
            "CompressionType": "None",
        }

    def _upload_dataset(self, spec: TrainingSpec, dataset: DatasetInput, channel: str, shards: int) -> tuple[str, int]:
        """Headerless CSV under ``<prefix>/<job>/<channel>/``: one object per training instance,
        because ShardedByS3Key hands out whole objects. Returns the channel's S3 prefix URI."""
        rows = pq.ParquetFile(dataset.path).metadata.num_rows
        shards = max(1, min(shards, rows))
        per_shard = max(1, math.ceil(rows / shards))
        names = ["data.csv"] if shards == 1 else [f"data-{i:05d}.csv" for i in range(shards)]
        keys = [self._key(spec.job_name, channel, name) for name in names]
        self._check_bucket()
        try:
            self._write_shards(dataset, keys, per_shard)
        except ClientError as exc:
            self._raise_if_transient(exc)
            raise _Permanent(
                f"uploading the {channel} data to {_s3_uri(self._bucket, keys[0])} failed: {_message(exc)}"
            ) from exc
        return _s3_uri(self._bucket, self._key(spec.job_name, channel)) + "/", shards

    def _write_shards(self, dataset: DatasetInput, keys: list[str], per_shard: int) -> None:
        """Stream the pieces into their objects; an interrupted multipart upload is aborted."""
        writer: _MultipartWriter | None = None
        written = 0
        try:
            for rows, data in self._shard_pieces(dataset, per_shard):
                key = keys[min(written // per_shard, len(keys) - 1)]
                if writer is None or writer.key != key:
                    if writer is not None:
                        writer.close()
                    writer = _MultipartWriter(self.client("s3"), self._bucket, key, "text/csv")
                writer.write(data)
                written += rows
            if writer is not None:
                writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise

    @staticmethod
    def _shard_pieces(dataset: DatasetInput, per_shard: int) -> Iterator[tuple[int, bytes]]:
        """CSV batches cut at shard boundaries, so a piece never straddles two objects."""
        parquet = pq.ParquetFile(dataset.path)
        options = pa_csv.WriteOptions(include_header=False)
        position = 0
        for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=dataset.columns):
            table = pa.Table.from_batches([batch]).select(dataset.columns)
            start = 0
            while start < table.num_rows:
                take = min(table.num_rows - start, per_shard - position % per_shard)
                sink = io.BytesIO()
                pa_csv.write_csv(table.slice(start, take), sink, write_options=options)
                yield take, sink.getvalue()
                start, position = start + take, position + take

    def _check_bucket(self) -> None:
        """A missing or forbidden bucket is a configuration problem: say so plainly."""
        try:
            self.client("s3").head_bucket(Bucket=self._bucket)
        except ClientError as exc:
            self._raise_if_transient(exc)
            if _http_status(exc) == 404 or _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise _Permanent(f"S3 bucket {self._bucket!r} does not exist (setting CENTROID_S3_BUCKET)") from exc
            raise _Permanent(
                f"S3 bucket {self._bucket!r} is not accessible with the configured AWS credentials "
                f"({_message(exc) or _http_status(exc)}); see docs/sagemaker.md for the IAM permissions"
            ) from exc

    @staticmethod
    def _raise_if_transient(exc: ClientError) -> None:
        if _is_transient(exc):
            raise exc

    def _poll_delay(self, polls: int) -> float:
        """2 s, 4 s, 8 s ... up to ``remote_poll_seconds``: quick feedback early, few calls later."""
        return min(FIRST_POLL_SECONDS * 2 ** min(polls, 20), self.settings.remote_poll_seconds)

    def _poll(self, spec: TrainingSpec) -> TrainingUpdate:
        name = spec.remote["training_job_name"]
        polls = int(spec.remote.get("polls", 0)) + 1
        try:
            described = self.client("sagemaker").describe_training_job(TrainingJobName=name)
        except ClientError as exc:
            if _is_not_found(exc):
                return _failed(f"the SageMaker training job {name!r} no longer exists ({_message(exc)})")
            raise
        status = str(described["TrainingJobStatus"])
        update = TrainingUpdate(
            status=status,
            secondary_status=str(described.get("SecondaryStatus") or status),
            message=self._status_message(described),
            failure_reason=described.get("FailureReason"),
            training_seconds=described.get("TrainingTimeInSeconds"),
            billable_seconds=described.get("BillableTimeInSeconds"),
            remote={"polls": polls, "sagemaker_status": status},
            transitions=_transitions(described),
            poll_after_seconds=self._poll_delay(polls),
        )
        if status == "Failed" and not update.failure_reason:
            update.failure_reason = "SageMaker reported the training job Failed without a reason"
        if status == "InProgress" and spec.stop_requested:
            self._keep_stopping(spec, update)
        if status == "Completed":
            self._collect(spec, described, update)
        return update

    @staticmethod
    def _status_message(described: dict[str, Any]) -> str:
        transitions = described.get("SecondaryStatusTransitions") or []
        last = transitions[-1].get("StatusMessage") if transitions else None
        return str(last or f"SageMaker: {described['TrainingJobStatus']} / {described.get('SecondaryStatus', '')}")

    def _keep_stopping(self, spec: TrainingSpec, update: TrainingUpdate) -> None:
        """Stop was asked but SageMaker still trains: show Stopping, and re-send a lost stop."""
        attempts = int(spec.remote.get("stop_attempts", 0))
        if attempts and attempts < MAX_STOP_ATTEMPTS:
            self._send_stop(spec.remote["training_job_name"])
        update.status, update.secondary_status = "Stopping", "Stopping"
        update.message = "stop requested; waiting for SageMaker to stop the training job"
        update.remote["stop_attempts"] = attempts + 1

    def _collect(self, spec: TrainingSpec, described: dict[str, Any], update: TrainingUpdate) -> None:
        """Download and read the artifact; an unusable one fails the job (the worker registers it)."""
        uri = str(described.get("ModelArtifacts", {}).get("S3ModelArtifacts") or "")
        if not uri:
            self._fail(update, "SageMaker reported the job Completed but named no model artifact")
            return
        try:
            artifact = self._download(uri)
            centroids = read_model_tar(artifact)
        except _Permanent as exc:
            self._fail(update, str(exc))
            return
        except ModelFormatError as exc:
            self._fail(update, f"the model artifact at {uri} is not a usable KMeans model.tar.gz: {exc}")
            return
        expected = (spec.hyperparameters.k, len(spec.train.columns))
        if centroids.shape != expected:
            self._fail(update, f"the model artifact at {uri} holds {centroids.shape} centroids, expected {expected}")
            return
        metrics = {
            _metric_name(str(item["MetricName"])): float(item["Value"])
            for item in described.get("FinalMetricDataList") or []
            if "MetricName" in item and "Value" in item
        }
        update.remote["model_artifact_s3_uri"] = uri
        update.message = "training job completed on SageMaker"
        update.result = TrainedModel(
            centroids=centroids, artifact=artifact, metrics=metrics, cluster_sizes=None, engine_version=None, seed=None
        )

    @staticmethod
    def _fail(update: TrainingUpdate, reason: str) -> None:
        update.status, update.secondary_status, update.failure_reason = "Failed", "Failed", reason
        update.transitions = None

    def _download(self, uri: str) -> bytes:
        bucket, key = _split_s3_uri(uri)
        try:
            response = self.client("s3").get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):
                raise _Permanent(f"the model artifact {uri} is missing ({_message(exc)})") from exc
            self._raise_if_transient(exc)
            raise _Permanent(f"the model artifact {uri} could not be read: {_message(exc)}") from exc
        if int(response.get("ContentLength") or 0) > MAX_ARTIFACT_BYTES:
            raise _Permanent(f"the model artifact {uri} is larger than {MAX_ARTIFACT_BYTES} bytes")
        return bytes(response["Body"].read())

    def stop_training(self, spec: TrainingSpec) -> None:
        """Send StopTrainingJob; a failure is logged and the stop re-sent while SageMaker trains on."""
        name = spec.remote.get("training_job_name")
        if name:
            self._send_stop(str(name))

    def _send_stop(self, name: str) -> None:
        try:
            self.client("sagemaker").stop_training_job(TrainingJobName=name)
            log.info("asked SageMaker to stop training job %s", name)
        except ClientError as exc:
            log.warning("StopTrainingJob %s failed (%s); will retry while it still runs", name, _message(exc))
        except BotoCoreError as exc:
            log.warning("StopTrainingJob %s failed (%s); will retry while it still runs", name, type(exc).__name__)

    # --- endpoints ----------------------------------------------------------------------------

    @staticmethod
    def _deployment(spec: EndpointSpec) -> _Deployment:
        """SageMaker names for ``spec.model`` on this endpoint, derived so retries find them again."""
        endpoint = str(spec.remote.get("endpoint_name") or spec.name)
        name = _derived_name(spec.name, spec.model.model_id)
        return _Deployment(endpoint=endpoint, config=name, model=name)

    @staticmethod
    def _owned(spec: EndpointSpec, config_name: str) -> bool:
        """Whether an existing SageMaker endpoint is this Centroid endpoint's: we recorded creating
        it, or it runs a config named the way we name them (a worker died right after creating)."""
        return bool(spec.remote.get("endpoint_arn")) or config_name.startswith(f"{_name_stem(spec.name)}-")

    def advance_endpoint(self, spec: EndpointSpec) -> EndpointUpdate:
        """Create the endpoint, or switch it to ``spec.model``, and report until InService."""
        self.ensure_configured()
        target = self._deployment(spec)
        try:
            described = self._describe_endpoint(target.endpoint)
            if described is None:
                return self._create_endpoint(spec, target)
            if not self._owned(spec, str(described.get("EndpointConfigName", ""))):
                return EndpointUpdate(
                    status="Failed",
                    failure_reason=f"a SageMaker endpoint named {target.endpoint!r} already exists in this account "
                    "and was not created by this Centroid; choose another endpoint name",
                )
            return self._follow_endpoint(spec, target, described)
        except _Permanent as exc:
            return EndpointUpdate(status="Failed", failure_reason=str(exc))

    def _waiting(self, spec: EndpointSpec, **remote: Any) -> EndpointUpdate:
        """Still working: report the status the Centroid endpoint is in (Creating or Updating)."""
        polls = int(spec.remote.get("polls", 0)) + 1
        serving = spec.remote.get("serving_model_id")
        status = "Updating" if serving and serving != spec.model.model_id else "Creating"
        return EndpointUpdate(
            status=status, remote={**remote, "polls": polls}, poll_after_seconds=self._poll_delay(polls)
        )

    def _create_endpoint(self, spec: EndpointSpec, target: _Deployment) -> EndpointUpdate:
        self._ensure_model(spec, target)
        try:
            arn = self.client("sagemaker").create_endpoint(
                EndpointName=target.endpoint,
                EndpointConfigName=target.config,
                Tags=[{"Key": "centroid:endpoint", "Value": spec.name}],
            )["EndpointArn"]
        except ClientError as exc:
            self._raise_if_transient(exc)
            raise _Permanent(f"SageMaker refused CreateEndpoint: {_message(exc)}") from exc
        log.info("creating SageMaker endpoint", extra={"endpoint": target.endpoint, "config": target.config})
        return self._waiting(
            spec, endpoint_name=target.endpoint, endpoint_arn=arn, requested_config=target.config, failed_config=None
        )

    def _follow_endpoint(self, spec: EndpointSpec, target: _Deployment, described: dict[str, Any]) -> EndpointUpdate:
        status = str(described["EndpointStatus"])
        current = str(described.get("EndpointConfigName", ""))
        arn = {"endpoint_name": target.endpoint, "endpoint_arn": described.get("EndpointArn")}
        if status in ENDPOINT_BUSY:
            return self._waiting(spec, **arn)
        if current == target.config:
            return self._settled(spec, target, status, described, arn)
        if status == "InService" and spec.remote.get("requested_config") == target.config:
            self._delete_deployment(target)  # SageMaker rolled the update back; drop the unused model
            return EndpointUpdate(
                status="Failed",
                failure_reason=described.get("FailureReason") or "SageMaker rolled the update back",
                remote={**arn, "requested_config": None},
            )
        if status == "InService":
            return self._update_endpoint(spec, target, current, arn)
        self._delete_sagemaker_endpoint(target.endpoint)  # a failed endpoint cannot be updated: recreate it
        return self._waiting(spec, **arn)

    def _settled(
        self, spec: EndpointSpec, target: _Deployment, status: str, described: dict[str, Any], arn: dict[str, Any]
    ) -> EndpointUpdate:
        """The endpoint runs the config we want: InService (tidy up), or Failed."""
        if status == "InService":
            previous = spec.remote.get("previous_config")
            if previous and previous != target.config:
                self._delete_deployment(_Deployment(target.endpoint, previous, previous))
            return EndpointUpdate(
                status="InService",
                remote={
                    **arn,
                    "config_name": target.config,
                    "model_name": target.model,
                    "serving_model_id": spec.model.model_id,
                    "previous_config": None,
                    "requested_config": None,
                    "polls": 0,
                },
            )
        if spec.remote.get("failed_config") == target.config:  # asked again after a failure: start over
            self._delete_sagemaker_endpoint(target.endpoint)
            return self._waiting(spec, **arn, failed_config=None)
        reason = described.get("FailureReason") or f"SageMaker reports the endpoint {status}"
        return EndpointUpdate(
            status="Failed",
            failure_reason=str(reason),
            remote={**arn, "failed_config": target.config, "serving_model_id": None, "requested_config": None},
        )

    def _update_endpoint(
        self, spec: EndpointSpec, target: _Deployment, current: str, arn: dict[str, Any]
    ) -> EndpointUpdate:
        self._ensure_model(spec, target)
        try:
            self.client("sagemaker").update_endpoint(EndpointName=target.endpoint, EndpointConfigName=target.config)
        except ClientError as exc:
            self._raise_if_transient(exc)
            raise _Permanent(f"SageMaker refused UpdateEndpoint: {_message(exc)}") from exc
        log.info("switching SageMaker endpoint", extra={"endpoint": target.endpoint, "config": target.config})
        return self._waiting(spec, **arn, requested_config=target.config, previous_config=current)

    def _ensure_model(self, spec: EndpointSpec, target: _Deployment) -> None:
        """model.tar.gz in S3, then the SageMaker model and endpoint config (each only if absent)."""
        sagemaker = self.client("sagemaker")
        data_url = self._ensure_artifact(spec)
        try:
            if not self._exists(sagemaker.describe_model, ModelName=target.model):
                sagemaker.create_model(
                    ModelName=target.model,
                    PrimaryContainer={"Image": kmeans_image(str(self.settings.aws_region)), "ModelDataUrl": data_url},
                    ExecutionRoleArn=self.settings.sagemaker_role_arn,
                    Tags=[{"Key": "centroid:model", "Value": spec.model.model_id}],
                )
            if not self._exists(sagemaker.describe_endpoint_config, EndpointConfigName=target.config):
                sagemaker.create_endpoint_config(
                    EndpointConfigName=target.config,
                    ProductionVariants=[
                        {
                            "VariantName": VARIANT,
                            "ModelName": target.model,
                            "InstanceType": spec.instance_config.get("instance_type")
                            or self.settings.endpoint_instance_type,
                            "InitialInstanceCount": int(
                                spec.instance_config.get("instance_count") or self.settings.endpoint_instance_count
                            ),
                            "InitialVariantWeight": 1.0,
                        }
                    ],
                )
        except ClientError as exc:
            self._raise_if_transient(exc)
            raise _Permanent(
                f"SageMaker refused to create the model for {spec.model.model_id}: {_message(exc)}"
            ) from exc

    def _ensure_artifact(self, spec: EndpointSpec) -> str:
        key = self._key("models", spec.model.model_id, "model.tar.gz")
        s3 = self.client("s3")
        try:
            if not self._exists(s3.head_object, Bucket=self._bucket, Key=key):
                self._check_bucket()
                s3.put_object(Bucket=self._bucket, Key=key, Body=spec.model.artifact(), ContentType="application/gzip")
        except ClientError as exc:
            self._raise_if_transient(exc)
            raise _Permanent(
                f"uploading the model artifact to {_s3_uri(self._bucket, key)} failed: {_message(exc)}"
            ) from exc
        except OSError as exc:
            raise _Permanent(f"the model artifact of {spec.model.model_id} cannot be read: {exc}") from exc
        return _s3_uri(self._bucket, key)

    @staticmethod
    def _exists(describe: Any, **kwargs: Any) -> bool:
        try:
            describe(**kwargs)
        except ClientError as exc:
            if _is_not_found(exc) or (_code(exc) == "403" and "Key" in kwargs):
                return False  # HeadObject says 403 for a missing key without s3:ListBucket
            raise
        return True

    def _describe_endpoint(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.client("sagemaker").describe_endpoint(EndpointName=name))
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise

    def _delete_sagemaker_endpoint(self, name: str) -> None:
        self._tolerant(self.client("sagemaker").delete_endpoint, EndpointName=name)

    def _delete_deployment(self, deployment: _Deployment) -> None:
        sagemaker = self.client("sagemaker")
        self._tolerant(sagemaker.delete_endpoint_config, EndpointConfigName=deployment.config)
        self._tolerant(sagemaker.delete_model, ModelName=deployment.model)

    @staticmethod
    def _tolerant(call: Any, **kwargs: Any) -> None:
        """Deleting what is already gone is success."""
        try:
            call(**kwargs)
        except ClientError as exc:
            if not _is_not_found(exc):
                raise

    def delete_endpoint(self, spec: EndpointSpec) -> EndpointUpdate:
        """Delete the endpoint, wait until it is gone, then its configs and models."""
        self.ensure_configured()
        target = self._deployment(spec)
        described = self._describe_endpoint(target.endpoint)
        if described is not None and not self._owned(spec, str(described.get("EndpointConfigName", ""))):
            log.warning("SageMaker endpoint %s is not this Centroid's; leaving it alone", target.endpoint)
            return EndpointUpdate.deleted()
        leftovers = self._leftovers(spec, target, described)
        if described is not None:
            if described["EndpointStatus"] != "Deleting":
                self._delete_sagemaker_endpoint(target.endpoint)
            if self._describe_endpoint(target.endpoint) is not None:
                polls = int(spec.remote.get("polls", 0)) + 1
                return EndpointUpdate(
                    status="Deleting",
                    remote={"cleanup": leftovers, "polls": polls},
                    poll_after_seconds=self._poll_delay(polls),
                )
        for name in leftovers:
            self._delete_deployment(_Deployment(target.endpoint, name, name))
        log.info("deleted SageMaker endpoint", extra={"endpoint": target.endpoint})
        return EndpointUpdate.deleted()

    def _leftovers(self, spec: EndpointSpec, target: _Deployment, described: dict[str, Any] | None) -> list[str]:
        """Every config/model name this endpoint may have created (each is both)."""
        names = {target.config, *spec.remote.get("cleanup", [])}
        for key in ("config_name", "previous_config", "requested_config", "failed_config"):
            if spec.remote.get(key):
                names.add(str(spec.remote[key]))
        if described is not None and described.get("EndpointConfigName"):
            names.add(str(described["EndpointConfigName"]))
        return sorted(names)

    # --- invocations --------------------------------------------------------------------------

    def invoke(self, spec: EndpointSpec, features: np.ndarray) -> Prediction:
        """InvokeEndpoint with CSV rows (in payload-sized chunks); the same shape local endpoints give."""
        name = str(spec.remote.get("endpoint_name") or spec.name)
        pieces: list[Prediction] = []
        for body in features_csv(features):
            rows = body.count(b"\n")
            payload = self._invoke_once(name, body)
            pieces.append(parse_predictions(payload, rows))
        if not pieces:
            return Prediction(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
        return Prediction(
            closest_cluster=np.concatenate([p.closest_cluster for p in pieces]),
            distance_to_cluster=np.concatenate([p.distance_to_cluster for p in pieces]),
        )

    def _invoke_once(self, name: str, body: bytes) -> bytes:
        try:
            response = self.client("sagemaker-runtime").invoke_endpoint(
                EndpointName=name, ContentType="text/csv", Accept="application/json", Body=body
            )
            return bytes(response["Body"].read())
        except ClientError as exc:
            original = int(exc.response.get("OriginalStatusCode") or 0)
            if _code(exc) == "ModelError" and 400 <= original < 500:
                raise InvalidInput(f"the SageMaker endpoint rejected the input: {_message(exc)}") from exc
            raise ServiceUnavailable(f"the SageMaker endpoint {name!r} failed: {_message(exc)}") from exc
        except BotoCoreError as exc:
            raise ServiceUnavailable(f"the SageMaker endpoint {name!r} is unreachable: {type(exc).__name__}") from exc
