"""S3: training data streamed up as headerless CSV (one object per training instance, in multipart
pieces), model artifacts put and fetched, and a plain answer when the bucket is missing."""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from service.backends.base import DatasetInput, EndpointSpec
from service.backends.sagemaker.client import AWS_FAILURES, AwsContext, NotFound, Permanent, aws_call, exists

log = logging.getLogger("centroid.sagemaker")

MAX_ARTIFACT_BYTES = 1 << 30
PART_BYTES = 8 * 1024 * 1024  # S3 multipart part size (S3's minimum is 5 MiB)
READ_BATCH_ROWS = 65_536


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def split_s3_uri(uri: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([^/]+)/(.+)", uri)
    if match is None:
        raise Permanent(f"SageMaker reported a model artifact location that is not an S3 URI: {uri!r}")
    return match.group(1), match.group(2)


def check_bucket(aws: AwsContext) -> None:
    """A missing or forbidden bucket is a configuration problem: say so plainly."""
    bucket = aws.bucket
    try:
        aws_call("HeadBucket", aws.client("s3").head_bucket, Bucket=bucket)
    except Permanent as exc:
        if exc.http_status == 404 or exc.code in ("404", "NoSuchBucket", "NotFound"):
            raise Permanent(f"S3 bucket {bucket!r} does not exist (setting CENTROID_S3_BUCKET)") from exc
        raise Permanent(
            f"S3 bucket {bucket!r} is not accessible with the configured AWS credentials "
            f"({exc.detail or exc.http_status}); see docs/sagemaker.md for the IAM permissions"
        ) from exc


# --- training data ------------------------------------------------------------------------------


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
            except AWS_FAILURES:
                log.warning("could not abort the multipart upload of s3://%s/%s", self.bucket, self.key)


def upload_dataset(aws: AwsContext, job_name: str, dataset: DatasetInput, channel: str, shards: int) -> tuple[str, int]:
    """Headerless CSV under ``<prefix>/<job>/<channel>/``: one object per training instance,
    because ShardedByS3Key hands out whole objects. Returns the channel's S3 prefix URI and the
    number of objects."""
    rows = pq.ParquetFile(dataset.path).metadata.num_rows
    shards = max(1, min(shards, rows))
    per_shard = max(1, math.ceil(rows / shards))
    names = ["data.csv"] if shards == 1 else [f"data-{i:05d}.csv" for i in range(shards)]
    keys = [aws.key(job_name, channel, name) for name in names]
    check_bucket(aws)
    what = f"uploading the {channel} data to {s3_uri(aws.bucket, keys[0])} failed"
    aws_call(what, _write_shards, aws, dataset, keys, per_shard)
    return s3_uri(aws.bucket, aws.key(job_name, channel)) + "/", shards


def _write_shards(aws: AwsContext, dataset: DatasetInput, keys: list[str], per_shard: int) -> None:
    """Stream the pieces into their objects; an interrupted multipart upload is aborted."""
    writer: _MultipartWriter | None = None
    written = 0
    try:
        for rows, data in _shard_pieces(dataset, per_shard):
            key = keys[min(written // per_shard, len(keys) - 1)]
            if writer is None or writer.key != key:
                if writer is not None:
                    writer.close()
                writer = _MultipartWriter(aws.client("s3"), aws.bucket, key, "text/csv")
            writer.write(data)
            written += rows
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


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


# --- model artifacts ----------------------------------------------------------------------------


def ensure_model_artifact(aws: AwsContext, spec: EndpointSpec) -> str:
    """The served model's ``model.tar.gz`` in S3 (put only if absent); returns its URI."""
    key = aws.key("models", spec.model.model_id, "model.tar.gz")
    uri = s3_uri(aws.bucket, key)
    try:
        aws_call(f"uploading the model artifact to {uri} failed", _put_if_absent, aws, key, spec.model.artifact)
    except OSError as exc:
        raise Permanent(f"the model artifact of {spec.model.model_id} cannot be read: {exc}") from exc
    return uri


def _put_if_absent(aws: AwsContext, key: str, body: Callable[[], bytes]) -> None:
    s3 = aws.client("s3")
    if not exists(s3.head_object, Bucket=aws.bucket, Key=key):
        check_bucket(aws)
        s3.put_object(Bucket=aws.bucket, Key=key, Body=body(), ContentType="application/gzip")


def download_artifact(aws: AwsContext, uri: str) -> bytes:
    """The bytes of a model artifact SageMaker wrote (at most :data:`MAX_ARTIFACT_BYTES`)."""
    bucket, key = split_s3_uri(uri)
    try:
        response = aws_call(
            f"the model artifact {uri} could not be read", aws.client("s3").get_object, Bucket=bucket, Key=key
        )
    except NotFound as exc:
        raise Permanent(f"the model artifact {uri} is missing ({exc.detail})") from exc
    if int(response.get("ContentLength") or 0) > MAX_ARTIFACT_BYTES:
        raise Permanent(f"the model artifact {uri} is larger than {MAX_ARTIFACT_BYTES} bytes")
    return bytes(response["Body"].read())
