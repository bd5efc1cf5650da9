"""S3: training data streamed up as headerless CSV (one object per training instance, in multipart
pieces), model artifacts put and fetched, and a plain answer when the bucket is missing.

How the training data is cut: the ``train`` channel is ``ShardedByS3Key``, so SageMaker gives each
instance whole objects (object i goes to instance i mod N); an instance left without an object
gets no data. So there is one object per instance, the rows split as evenly as they go (sizes
differ by at most one row: 100 rows for 30 instances are 10 objects of 4 rows and 20 of 3), and
never more objects than rows: with fewer rows than instances, there are as many objects as rows,
and the caller asks for as many instances as there are objects."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv

from service.backends.base import DatasetInput, EndpointSpec
from service.backends.sagemaker.client import AWS_FAILURES, AwsContext, NotFound, Permanent, aws_call, exists

log = logging.getLogger("centroid.sagemaker")

MAX_ARTIFACT_BYTES = 1 << 30
PART_BYTES = 8 * 1024 * 1024  # S3 multipart part size (S3's minimum is 5 MiB)
READ_BATCH_ROWS = 65_536


class UploadInterrupted(Exception):
    """An upload was abandoned because ``should_stop`` said so (its multipart upload aborted)."""


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


def upload_dataset(
    aws: AwsContext,
    job_name: str,
    dataset: DatasetInput,
    channel: str,
    shards: int,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[str, int]:
    """Headerless CSV under ``<prefix>/<job>/<channel>/``: ``shards`` objects (one per training
    instance, as ShardedByS3Key hands out whole objects) of near-equal row counts, or one per row
    when there are fewer rows. Returns the channel's S3 prefix URI and the number of objects.

    ``should_stop`` is asked before each piece; when it answers True the upload is abandoned:
    the object being written is aborted and :class:`UploadInterrupted` raised."""
    rows = dataset.rows
    shards = max(1, min(shards, rows))
    names = ["data.csv"] if shards == 1 else [f"data-{i:05d}.csv" for i in range(shards)]
    keys = [aws.key(job_name, channel, name) for name in names]
    check_bucket(aws)
    what = f"uploading the {channel} data to {s3_uri(aws.bucket, keys[0])} failed"
    aws_call(what, _write_shards, aws, dataset, keys, shard_ends(rows, shards), should_stop)
    return s3_uri(aws.bucket, aws.key(job_name, channel)) + "/", shards


def write_manifest(aws: AwsContext, job_name: str, dataset: DatasetInput, channel: str) -> tuple[str, int]:
    """A dataset in S3 whose objects SageMaker can read as they are (headerless numeric CSV of
    exactly the job's features, :attr:`DatasetInput.direct_s3_uri`): nothing is copied. A manifest
    (``S3DataType: ManifestFile``) under the job's prefix lists exactly the objects registered, so
    SageMaker reads those and only those (not an empty ``_SUCCESS``, nor objects added later under
    the prefix). Each object is checked first: one gone or of another size than registered fails
    the job, naming it. Returns the manifest's URI and the number of objects."""
    source = dataset.s3
    assert source is not None and dataset.direct_s3_uri is not None
    check_bucket(aws)
    s3 = aws.client("s3")
    for item in source.objects:
        head = aws_call(
            f"reading s3://{source.bucket}/{item.key} failed", s3.head_object, Bucket=source.bucket, Key=item.key
        )
        if int(head["ContentLength"]) != item.size:
            raise Permanent(
                f"s3://{source.bucket}/{item.key} changed since the dataset was registered ({head['ContentLength']} "
                f"bytes, registered with {item.size}); register the data again"
            )
    base = f"s3://{source.bucket}/"
    manifest = [{"prefix": base}, *(item.key for item in source.objects)]
    key = aws.key(job_name, f"{channel}.manifest")
    body = json.dumps(manifest).encode()
    aws_call(
        f"writing the {channel} manifest to {s3_uri(aws.bucket, key)} failed",
        s3.put_object,
        Bucket=aws.bucket,
        Key=key,
        Body=body,
        ContentType="application/json",
    )
    return s3_uri(aws.bucket, key), len(source.objects)


def shard_ends(rows: int, shards: int) -> list[int]:
    """Where each of ``shards`` near-equal shards of ``rows`` rows ends (exclusive): the first
    ``rows % shards`` shards hold one row more than the others."""
    return [(i + 1) * rows // shards for i in range(shards)]


def _write_shards(
    aws: AwsContext,
    dataset: DatasetInput,
    keys: list[str],
    ends: Sequence[int],
    should_stop: Callable[[], bool] | None,
) -> None:
    """Stream the pieces into their objects; an interrupted multipart upload is aborted."""
    writer: _MultipartWriter | None = None
    try:
        for shard, data in _shard_pieces(dataset, ends):
            if should_stop is not None and should_stop():
                raise UploadInterrupted(f"stopped before writing s3://{aws.bucket}/{keys[shard]} completely")
            if writer is None or writer.key != keys[shard]:
                if writer is not None:
                    writer.close()
                writer = _MultipartWriter(aws.client("s3"), aws.bucket, keys[shard], "text/csv")
            writer.write(data)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def _shard_pieces(dataset: DatasetInput, ends: Sequence[int]) -> Iterator[tuple[int, bytes]]:
    """(shard index, CSV bytes) batches cut at the shard ends, so a piece never straddles two objects.
    The features are read from the dataset's Parquet file, or from its objects for a dataset in S3
    (converted once, here: a CSV block at a time)."""
    options = pa_csv.WriteOptions(include_header=False)
    position, shard = 0, 0
    for batch in dataset.record_batches(READ_BATCH_ROWS):
        table = pa.Table.from_batches([batch])
        start = 0
        while start < table.num_rows:
            while position >= ends[shard]:
                shard += 1
            take = min(table.num_rows - start, ends[shard] - position)
            sink = io.BytesIO()
            pa_csv.write_csv(table.slice(start, take), sink, write_options=options)
            yield shard, sink.getvalue()
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
