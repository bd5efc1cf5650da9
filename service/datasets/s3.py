"""Datasets whose rows stay in S3: registration, and reading them where they are.

``POST /datasets/s3`` names a prefix (``s3://bucket/prefix/``). Its objects are listed once (at
most :data:`~schemas.datasets.MAX_S3_OBJECTS`), and what a dataset row needs is read from the data
itself, never copied into Centroid:

* Parquet: each object's footer (schema, row count, and the row groups' statistics for the
  per-column summary; a column chunk without statistics is read on its own). Every object must
  have the same columns with the same types.
* CSV: the header (or, without one, the names given or ``f0``, ``f1``, ...) and the column types
  inferred by pyarrow from the first MiB of the first object; then one streaming pass over every
  object counts its rows, checks each object's header and values (a column that turns out to hold
  text is read again as text, as uploads do) and computes the summary. Memory is one CSV block.

Everything goes through pyarrow's S3 filesystem (no boto3 here: only the SageMaker backend imports
it), opened with the settings the SageMaker backend uses: ``CENTROID_AWS_REGION``,
``CENTROID_AWS_ENDPOINT_URL`` (a moto server in tests) and ``CENTROID_AWS_MAX_ATTEMPTS``, with
credentials from the AWS SDK's standard chain (environment, shared files, web identity, instance
metadata), as boto3 finds them.

The dataset row keeps the objects' keys, sizes and row counts (``datasets.location``); a training
reads those objects (:func:`dataset_input`) and fails, naming the object, if one changed since.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from schemas.datasets import MAX_S3_OBJECTS, S3DatasetCreate
from service.backends.base import DatasetInput, S3Input, S3Object
from service.datasets.ingest import SummaryBuilder
from service.db.tables import DatasetTable
from service.engine.errors import EngineInputError
from service.engine.sources import CsvLayout, FilesBatchSource
from service.errors import AppError, InvalidInput, NotConfigured, ServiceUnavailable
from service.settings import Settings
from service.storage import LocalArtifactStore

SAMPLE_BYTES = 1 << 20  # what CSV column types are inferred from: the first MiB of the first object
CSV_BLOCK_BYTES = 4 << 20  # pyarrow's CSV block: the unit read, converted and held at once
FOOTER_THREADS = 8  # Parquet footers read at once (each is one or two ranged GETs)
CSV_EXTENSIONS = (".csv", ".tsv", ".txt")
PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")
COMPRESSED_EXTENSIONS = (".gz", ".gzip", ".bz2", ".zst", ".zstd", ".lz4", ".xz", ".zip", ".snappy", ".br")
CONNECT_TIMEOUT_SECONDS = 5.0
REQUEST_TIMEOUT_SECONDS = 60.0

_CSV_COLUMN_ERROR = re.compile(r"In CSV column #(\d+)")


# --- where: URIs, the filesystem, and what S3 answers ------------------------------------------


@dataclass(frozen=True)
class S3Prefix:
    """``s3://bucket/prefix/``; ``prefix`` is "" for a whole bucket, else ends with ``/``."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Prefix:
        match = re.fullmatch(r"s3://([^/]+)/?(.*)", uri)
        if match is None or not match.group(1):
            raise InvalidInput(f"not an S3 URI: {uri!r}; expected s3://bucket/prefix/", details={"uri": uri})
        prefix = match.group(2)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if "//" in prefix or prefix.startswith("/"):
            raise InvalidInput(f"S3 prefix {prefix!r} holds an empty path segment", details={"uri": uri})
        return cls(match.group(1), prefix)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def path(self) -> str:
        """The prefix as pyarrow names it (``bucket/prefix``, no trailing ``/``)."""
        return f"{self.bucket}/{self.prefix}".rstrip("/")


def require_s3_settings(settings: Settings) -> None:
    """409 ``not_configured`` unless the settings say which AWS (or S3-compatible service) to ask."""
    if not settings.aws_region:
        raise NotConfigured(
            "datasets in S3 are not configured on this server: set CENTROID_AWS_REGION (and, for an S3-compatible "
            "service or an emulator, CENTROID_AWS_ENDPOINT_URL); credentials come from the AWS standard chain",
            details={"missing": ["CENTROID_AWS_REGION"]},
        )


def s3_filesystem(settings: Settings) -> pa_fs.S3FileSystem:
    """pyarrow's S3 filesystem with the SageMaker backend's region, endpoint and attempts.

    409 ``not_configured`` when no region is configured: without one nothing says which AWS (or
    emulator) to ask, and a request must never wander off to the internet by default."""
    require_s3_settings(settings)
    options: dict[str, Any] = {}
    if settings.aws_endpoint_url:
        parts = urlsplit(settings.aws_endpoint_url)
        options["endpoint_override"] = (parts.netloc.rpartition("@")[2] + parts.path).rstrip("/")
        options["scheme"] = parts.scheme or "https"
    return pa_fs.S3FileSystem(
        region=settings.aws_region,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        request_timeout=REQUEST_TIMEOUT_SECONDS,
        retry_strategy=pa_fs.AwsStandardS3RetryStrategy(max_attempts=settings.aws_max_attempts),
        **options,
    )


def s3_failure(exc: OSError, where: str, *, listing: bool = False) -> AppError:
    """What S3 answered through pyarrow, as the error the client sees (``where``: the URI; ``listing``:
    the answer was to a listing of the prefix, not a read of an object)."""
    text = str(exc)
    details: dict[str, Any] = {"uri": where, "s3_error": text[:500]}
    if isinstance(exc, FileNotFoundError) and listing:
        return InvalidInput(
            f"nothing found at {where}: no object has this prefix", details={**details, "reason": "not_found"}
        )
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return InvalidInput(f"the S3 bucket of {where} does not exist", details={**details, "reason": "no_such_bucket"})
    if isinstance(exc, FileNotFoundError) or "NO_SUCH_KEY" in text or "HTTP status 404" in text:
        return InvalidInput(
            f"an object of {where} is gone (it was there when listed): {text[:300]}",
            details={**details, "reason": "not_found"},
        )
    denied = ("ACCESS_DENIED", "AccessDenied", "HTTP status 403", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")
    if any(marker in text for marker in denied):
        return InvalidInput(
            f"S3 refused access to {where} with the credentials Centroid runs with (the AWS standard chain); "
            "they need s3:ListBucket on the bucket and s3:GetObject on the objects",
            details={**details, "reason": "access_denied"},
        )
    return ServiceUnavailable(
        f"S3 could not be read at {where}: {text[:300]}", details={**details, "reason": "s3_unavailable"}
    )


@contextmanager
def s3_errors(where: str, *, listing: bool = False) -> Iterator[None]:
    """Map pyarrow's S3 failures (OSError) and unreadable data (ArrowInvalid) to client errors."""
    try:
        yield
    except OSError as exc:
        raise s3_failure(exc, where, listing=listing) from exc
    except pa.ArrowInvalid as exc:
        raise InvalidInput(f"the data at {where} cannot be read: {exc}", details={"uri": where}) from exc


# --- listing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listed:
    """The objects under a prefix: data, and what is skipped (empty, ``_...``, ``.…``)."""

    data: list[pa_fs.FileInfo]
    skipped: list[pa_fs.FileInfo]


def list_objects(filesystem: pa_fs.FileSystem, where: S3Prefix) -> Listed:
    """Every object under the prefix, in key order; 400 above MAX_S3_OBJECTS or with no data."""
    with s3_errors(where.uri, listing=True):
        infos = filesystem.get_file_info(pa_fs.FileSelector(where.path, recursive=True))
    files = sorted((info for info in infos if info.type == pa_fs.FileType.File), key=lambda info: info.path)
    if len(files) > MAX_S3_OBJECTS:
        raise InvalidInput(
            f"{where.uri} holds {len(files)} objects; a dataset in S3 may have at most {MAX_S3_OBJECTS} "
            "(write fewer, larger objects, or register a narrower prefix)",
            details={"uri": where.uri, "objects": len(files), "max_objects": MAX_S3_OBJECTS, "reason": "too_many"},
        )
    skipped = [info for info in files if info.size == 0 or info.base_name.startswith(("_", "."))]
    data = [info for info in files if info not in skipped]
    if not data:
        shown = ", ".join(info.path.partition("/")[2] for info in skipped[:5])
        raise InvalidInput(
            f"no data objects under {where.uri}" + (f" (only {shown})" if shown else ""),
            details={"uri": where.uri, "skipped": len(skipped), "reason": "no_objects"},
        )
    return Listed(data, skipped)


def object_format(infos: list[pa_fs.FileInfo], asked: str, where: str) -> str:
    """``csv`` or ``parquet`` for these objects: the one asked, or from their extensions."""
    kinds: dict[str, list[str]] = {"csv": [], "parquet": [], "unknown": []}
    for info in infos:
        name = info.base_name.lower()
        if name.endswith(COMPRESSED_EXTENSIONS):
            raise InvalidInput(
                f"{where}: compressed objects are not supported ({info.base_name}); store them uncompressed",
                details={"uri": where, "object": info.path.partition("/")[2], "reason": "compressed"},
            )
        kind = "csv" if name.endswith(CSV_EXTENSIONS) else "parquet" if name.endswith(PARQUET_EXTENSIONS) else "unknown"
        kinds[kind].append(info.base_name)
    if kinds["csv"] and kinds["parquet"]:
        raise InvalidInput(
            f"{where} mixes CSV ({kinds['csv'][0]}, ...) and Parquet ({kinds['parquet'][0]}, ...) objects; "
            "a dataset is one format",
            details={"uri": where, "csv": kinds["csv"][:5], "parquet": kinds["parquet"][:5], "reason": "mixed_formats"},
        )
    found = "csv" if kinds["csv"] else "parquet" if kinds["parquet"] else None
    if asked != "auto":
        if found is not None and found != asked:
            raise InvalidInput(
                f"format {asked!r} was asked for, but {where} holds {found} objects ({kinds[found][0]}, ...)",
                details={"uri": where, "format": asked, "found": found, "reason": "mixed_formats"},
            )
        return asked
    if found is None or kinds["unknown"]:
        unknown = kinds["unknown"][0]
        raise InvalidInput(
            f"cannot tell the format of {unknown} (under {where}) from its name; pass format: csv or parquet",
            details={"uri": where, "object": unknown, "reason": "unknown_format"},
        )
    return found


# --- summaries ----------------------------------------------------------------------------------


@dataclass
class _Summary:
    """Per-column count, nulls, min, max (and for numbers mean and std) over streamed batches, in
    the shape of the stored datasets' summaries."""

    columns: list[dict[str, str]]
    moments: SummaryBuilder = field(init=False)
    rows: int = 0
    nulls: list[int] = field(init=False)
    low: list[Any] = field(init=False)
    high: list[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.moments = SummaryBuilder(self.columns)
        self.nulls = [0] * len(self.columns)
        self.low = [None] * len(self.columns)
        self.high = [None] * len(self.columns)

    def add(self, arrays: list[pa.Array]) -> None:
        self.moments.add(arrays)
        self.rows += len(arrays[0]) if arrays else 0
        for index, array in enumerate(arrays):
            self.nulls[index] += array.null_count
            self.extend(index, *(value.as_py() for value in pc.min_max(array).values()))

    def extend(self, index: int, low: Any, high: Any) -> None:
        if low is None:
            return
        self.low[index] = low if self.low[index] is None else min(self.low[index], low)
        self.high[index] = high if self.high[index] is None else max(self.high[index], high)

    def result(self, *, moments: bool = True) -> list[dict[str, Any]]:
        out = []
        for index, column in enumerate(self.columns):
            count = self.rows - self.nulls[index]
            entry: dict[str, Any] = {
                "name": column["name"],
                "dtype": column["dtype"],
                "count": count,
                "null_count": self.nulls[index],
                "min": None,
                "max": None,
                "mean": None,
                "std": None,
            }
            if count and self.low[index] is not None:
                if column["dtype"] == "string":
                    entry["min"], entry["max"] = _text(self.low[index]), _text(self.high[index])
                else:
                    entry["min"], entry["max"] = float(self.low[index]), float(self.high[index])
                    if moments:
                        state = self.moments.moments[index]
                        entry["mean"] = state.mean
                        entry["std"] = math.sqrt(state.m2 / (count - 1)) if count > 1 else None
            out.append(entry)
        return out


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# --- registration -------------------------------------------------------------------------------


@dataclass
class Registered:
    """What a dataset row needs, read from the objects."""

    columns: list[dict[str, str]]
    row_count: int
    size_bytes: int
    location: dict[str, Any]
    recipe: dict[str, Any]
    summary: list[dict[str, Any]]


def register(filesystem: pa_fs.FileSystem, request: S3DatasetCreate, *, max_columns: int) -> Registered:
    """List the prefix and read schema, row counts and summary from the objects (no copy)."""
    where = S3Prefix.parse(request.uri)
    listed = list_objects(filesystem, where)
    file_format = object_format(listed.data, request.format, where.uri)
    if file_format == "parquet":
        if request.header is not None or request.columns or request.delimiter != ",":
            raise InvalidInput("header, delimiter and columns apply to CSV objects only", details={"uri": where.uri})
        read = _register_parquet(filesystem, listed.data, request, where.uri, max_columns)
    else:
        read = _register_csv(filesystem, listed.data, request, where.uri, max_columns)
    columns, rows_per_object, summary, csv_facts = read
    names = [column["name"] for column in columns]
    numeric = all(column["dtype"] != "string" for column in columns)
    direct = bool(
        csv_facts is not None
        and csv_facts["header"] is False
        and csv_facts["delimiter"] == ","
        and request.key_column is None
        and numeric
        and all(entry["null_count"] == 0 for entry in summary)
    )
    location: dict[str, Any] = {
        "uri": where.uri,
        "bucket": where.bucket,
        "prefix": where.prefix,
        "format": file_format,
        "objects": [
            {"key": info.path.partition("/")[2], "size": int(info.size), "rows": rows}
            for info, rows in zip(listed.data, rows_per_object, strict=True)
        ],
        "skipped": [{"key": info.path.partition("/")[2], "size": int(info.size)} for info in listed.skipped],
        "sagemaker_direct": direct,
    }
    if csv_facts is not None:
        location["csv"] = csv_facts
    return Registered(
        columns=columns,
        row_count=sum(rows_per_object),
        size_bytes=sum(int(info.size) for info in listed.data),
        location=location,
        recipe={"source": "s3", "uri": where.uri, "format": file_format, "columns": names},
        summary=summary,
    )


Read = tuple[list[dict[str, str]], list[int], list[dict[str, Any]], dict[str, Any] | None]


def _check_names(names: list[str], key_column: str | None, where: str, max_columns: int) -> None:
    if len(names) > max_columns:
        raise InvalidInput(f"{where}: {len(names)} columns; at most {max_columns} are allowed")
    blank = [index for index, name in enumerate(names) if not name.strip()]
    if blank:
        raise InvalidInput(f"{where}: column {blank[0]} has no name", details={"uri": where, "position": blank[0]})
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidInput(f"{where}: column names repeat: {repeated}", details={"uri": where, "repeated": repeated})
    if key_column is not None and key_column not in names:
        raise InvalidInput(
            f"key column {key_column!r} is not a column of {where}",
            details={"key_column": key_column, "columns": names[:50]},
        )


# Parquet ---------------------------------------------------------------------------------------


def parquet_dtype(kind: pa.DataType, name: str, where: str) -> str:
    """A Parquet column's dtype as datasets list them; nested columns are refused."""
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return "int64"
    if pa.types.is_floating(kind):
        return "float64"
    if pa.types.is_nested(kind):
        raise InvalidInput(
            f"{where}: column {name!r} is nested ({kind}); only flat columns are supported",
            details={"column": name, "type": str(kind)},
        )
    return "string"  # text, and any other type (dates, decimals...): shown, never a feature


@dataclass(frozen=True)
class _Footer:
    path: str
    schema: pa.Schema
    metadata: pq.FileMetaData


def _register_parquet(
    filesystem: pa_fs.FileSystem, infos: list[pa_fs.FileInfo], request: S3DatasetCreate, where: str, max_columns: int
) -> Read:
    def footer(info: pa_fs.FileInfo) -> _Footer:
        with (
            s3_errors(f"s3://{info.path}"),
            filesystem.open_input_file(info.path) as handle,
            pq.ParquetFile(handle) as file,
        ):
            return _Footer(info.path, file.schema_arrow, file.metadata)

    with ThreadPoolExecutor(max_workers=min(FOOTER_THREADS, len(infos))) as pool:
        footers = list(pool.map(footer, infos))
    first = footers[0]
    names = list(first.schema.names)
    _check_names(names, request.key_column, where, max_columns)
    columns = [{"name": name, "dtype": parquet_dtype(first.schema.field(name).type, name, where)} for name in names]
    for other in footers[1:]:
        theirs = [
            {"name": name, "dtype": parquet_dtype(other.schema.field(name).type, name, where)}
            for name in other.schema.names
        ]
        if theirs != columns:
            raise InvalidInput(
                f"the objects' schemas differ: s3://{first.path} has {_shown(columns)}, s3://{other.path} has "
                f"{_shown(theirs)}; every object of a dataset must have the same columns, in the same order",
                details={"first": f"s3://{first.path}", "other": f"s3://{other.path}", "reason": "schemas_differ"},
            )
    summary = _Summary(columns)
    for item in footers:
        _footer_statistics(filesystem, item, summary)
    return columns, [item.metadata.num_rows for item in footers], summary.result(moments=False), None


def _shown(columns: list[dict[str, str]]) -> str:
    shown = ", ".join(f"{column['name']} ({column['dtype']})" for column in columns[:20])
    return f"[{shown}{', ...' if len(columns) > 20 else ''}]"


def _footer_statistics(filesystem: pa_fs.FileSystem, footer: _Footer, summary: _Summary) -> None:
    """Rows, nulls, min and max from the row groups' statistics; a column chunk without them is
    read (one row group of one column at a time)."""
    metadata = footer.metadata
    positions = {name: index for index, name in enumerate(metadata.schema.names)}
    summary.rows += metadata.num_rows
    file: pq.ParquetFile | None = None
    try:
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            for index, column in enumerate(summary.columns):
                position = positions.get(column["name"])
                chunk = row_group.column(position) if position is not None else None
                stats = chunk.statistics if chunk is not None else None
                if (
                    chunk is not None
                    and stats is not None
                    and stats.has_null_count
                    and (stats.has_min_max or stats.null_count == chunk.num_values)
                ):
                    summary.nulls[index] += stats.null_count
                    if stats.has_min_max:
                        summary.extend(index, stats.min, stats.max)
                    continue
                if file is None:
                    with s3_errors(f"s3://{footer.path}"):
                        file = pq.ParquetFile(filesystem.open_input_file(footer.path), pre_buffer=False)
                with s3_errors(f"s3://{footer.path}"):
                    values = file.read_row_group(group, columns=[column["name"]]).column(0).combine_chunks()
                summary.nulls[index] += values.null_count
                summary.extend(index, *(value.as_py() for value in pc.min_max(values).values()))
    finally:
        if file is not None:
            file.close()


# CSV -------------------------------------------------------------------------------------------


def _is_number(text: str) -> bool:
    try:
        float(text.strip())
    except ValueError:
        return False
    return bool(text.strip())


def _first_lines(filesystem: pa_fs.FileSystem, info: pa_fs.FileInfo) -> bytes:
    """Up to SAMPLE_BYTES of the object, cut after its last complete line."""
    with s3_errors(f"s3://{info.path}"), filesystem.open_input_stream(info.path, compression=None) as stream:
        sample = stream.read(SAMPLE_BYTES)
    if len(sample) == SAMPLE_BYTES and b"\n" in sample:
        sample = sample[: sample.rindex(b"\n") + 1]
    return bytes(sample)


def csv_layout(facts: dict[str, Any], *, block_size: int = CSV_BLOCK_BYTES) -> CsvLayout:
    """pyarrow's options for the registered CSV objects: the same names and types for every one."""
    header = bool(facts["header"])
    types = {name: pa.string() if dtype == "string" else pa.float64() for name, dtype in facts["column_types"].items()}
    return CsvLayout(
        read=pa_csv.ReadOptions(
            block_size=block_size,
            column_names=None if header else list(facts["column_types"]),
            use_threads=True,
        ),
        parse=pa_csv.ParseOptions(delimiter=facts["delimiter"]),
        convert=pa_csv.ConvertOptions(
            column_types=types, null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True
        ),
    )


def _register_csv(
    filesystem: pa_fs.FileSystem, infos: list[pa_fs.FileInfo], request: S3DatasetCreate, where: str, max_columns: int
) -> Read:
    sample = _first_lines(filesystem, infos[0])
    first_line = sample.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    fields = next(csv.reader([first_line], delimiter=request.delimiter), [])
    if not fields:
        raise InvalidInput(f"the first object under {where} starts with an empty line", details={"uri": where})
    header = request.header if request.header is not None else not all(_is_number(value) for value in fields)
    given = None if header else list(request.columns or [f"f{index}" for index in range(len(fields))])
    key = {request.key_column: pa.string()} if request.key_column else {}
    with s3_errors(f"s3://{infos[0].path}"):
        inferred = pa_csv.read_csv(
            io.BytesIO(sample),
            read_options=pa_csv.ReadOptions(column_names=given),
            parse_options=pa_csv.ParseOptions(delimiter=request.delimiter),
            convert_options=pa_csv.ConvertOptions(column_types=key, null_values=[""], strings_can_be_null=True),
        ).schema
    names = list(inferred.names)
    _check_names(names, request.key_column, where, max_columns)
    numbers = [
        name
        for name in names
        if name != request.key_column
        and (pa.types.is_integer(inferred.field(name).type) or pa.types.is_floating(inferred.field(name).type))
    ]
    while True:  # a column inferred numeric that holds text further on is read again as text
        facts = {
            "header": header,
            "delimiter": request.delimiter,
            "column_types": {name: "float64" if name in numbers else "string" for name in names},
        }
        try:
            rows, summary, whole = _csv_pass(filesystem, infos, facts, where)
        except _TextColumn as found:
            numbers.remove(found.name)
            continue
        break
    columns = [
        {"name": name, "dtype": "string" if name not in numbers else "int64" if whole[name] else "float64"}
        for name in names
    ]
    summary = [{**entry, "dtype": column["dtype"]} for entry, column in zip(summary, columns, strict=True)]
    return columns, rows, summary, facts


class _TextColumn(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _csv_pass(
    filesystem: pa_fs.FileSystem, infos: list[pa_fs.FileInfo], facts: dict[str, Any], where: str
) -> tuple[list[int], list[dict[str, Any]], dict[str, bool]]:
    """Read every object once: rows per object, the summary, whether each number column holds
    only integers. Raises _TextColumn for a number column that holds text."""
    names = list(facts["column_types"])
    layout = csv_layout(facts)
    summary = _Summary([{"name": name, "dtype": dtype} for name, dtype in facts["column_types"].items()])
    whole = {name: True for name, dtype in facts["column_types"].items() if dtype != "string"}
    rows_per_object = []
    for info in infos:
        uri = f"s3://{info.path}"
        rows = 0
        try:
            with s3_errors(uri), filesystem.open_input_stream(info.path, compression=None) as stream:
                reader = pa_csv.open_csv(
                    stream, read_options=layout.read, parse_options=layout.parse, convert_options=layout.convert
                )
                if list(reader.schema.names) != names:
                    raise InvalidInput(
                        f"the objects' headers differ: {uri} has {list(reader.schema.names)[:20]}, the first object "
                        f"{names[:20]}; every object of a dataset must have the same columns, in the same order",
                        details={"object": uri, "reason": "schemas_differ"},
                    )
                with closing(reader):
                    for batch in reader:
                        _check_finite(batch, names, whole, uri, rows)
                        summary.add(list(batch.columns))
                        rows += batch.num_rows
        except InvalidInput as exc:
            column = _CSV_COLUMN_ERROR.search(exc.message)
            if column is not None and "conversion error" in exc.message:
                name = names[int(column.group(1))]
                if facts["column_types"].get(name) != "string":
                    raise _TextColumn(name) from exc
            raise
        rows_per_object.append(rows)
    return rows_per_object, summary.result(), whole


def _check_finite(batch: pa.RecordBatch, names: list[str], whole: dict[str, bool], uri: str, first_row: int) -> None:
    """nan and inf are refused, as in uploads; and note which number columns stay integral."""
    for name in whole:
        values = batch.column(names.index(name))
        finite = pc.is_finite(values)
        if finite.null_count != len(finite) and not pc.all(finite).as_py():
            row = int(np.flatnonzero(~finite.to_numpy(zero_copy_only=False).astype(bool))[0])
            raise InvalidInput(
                f"{uri}: column {name!r} holds a non-finite value ({values[row].as_py()}) at data row "
                f"{first_row + row}; nan and inf are refused, as in uploads",
                details={"object": uri, "column": name, "row": first_row + row},
            )
        if whole[name] and len(values) - values.null_count:
            whole[name] = bool(pc.all(pc.equal(values, pc.floor(values))).as_py()) and bool(
                pc.max(pc.abs(values)).as_py() < 2**53
            )


# --- reading a registered dataset ----------------------------------------------------------------


def _location(row: DatasetTable) -> dict[str, Any]:
    if row.location is None:
        raise InvalidInput(f"dataset {row.id!r} is not in S3")
    return row.location


def files_source(
    location: dict[str, Any], columns: list[str], filesystem: pa_fs.FileSystem, *, numeric: bool = True
) -> FilesBatchSource:
    """``columns`` of a dataset in S3 (its stored ``location``), read from its objects as they were
    registered; ``numeric=False`` for readers that take text columns too."""
    objects = location["objects"]
    return FilesBatchSource(
        filesystem,
        [f"{location['bucket']}/{item['key']}" for item in objects],
        columns,
        file_format=location["format"],
        rows_per_path=[int(item["rows"]) for item in objects],
        csv=csv_layout(location["csv"]) if location["format"] == "csv" else None,
        check_numeric=numeric,
    )


def dataset_input(
    row: DatasetTable, columns: list[str], store: LocalArtifactStore, filesystem: Callable[[], pa_fs.FileSystem]
) -> DatasetInput:
    """A dataset as a backend trains on it: its Parquet file, or (in S3) its objects."""
    if not row.in_s3:
        return DatasetInput(row.id, store.path(row.storage_key), list(columns), row.row_count)
    location = _location(row)
    names = [column["name"] for column in row.columns]
    return DatasetInput(
        row.id,
        None,
        list(columns),
        row.row_count,
        s3=S3Input(
            uri=location["uri"],
            bucket=location["bucket"],
            objects=tuple(S3Object(item["key"], int(item["size"])) for item in location["objects"]),
            skipped=tuple(S3Object(item["key"], int(item["size"])) for item in location.get("skipped", [])),
            source=files_source(location, list(columns), filesystem()),
            direct_columns=tuple(names) if location.get("sagemaker_direct") else None,
        ),
    )


def record_batches(
    row: DatasetTable, filesystem: pa_fs.FileSystem, batch_rows: int, *, first_row: int = 0
) -> Generator[pa.RecordBatch, None, None]:
    """Every column of a dataset in S3, from row ``first_row`` on, as typed Arrow batches (number
    columns listed as ``int64`` come back as integers). Objects before that row are not read.

    Failures are client errors (:func:`s3_errors`); an object whose rows changed since the
    registration is a 400 naming it."""
    location = _location(row)
    names = [column["name"] for column in row.columns]
    integers = {column["name"] for column in row.columns if column["dtype"] == "int64"}
    objects = location["objects"]
    start, before = 0, 0
    while start < len(objects) and before + int(objects[start]["rows"]) <= first_row:
        before += int(objects[start]["rows"])
        start += 1
    source = files_source({**location, "objects": objects[start:]}, names, filesystem, numeric=False)
    offset = first_row - before
    with s3_errors(location["uri"]):
        try:
            for batch in source.record_batches(batch_rows):
                if offset >= batch.num_rows:
                    offset -= batch.num_rows
                    continue
                if offset:
                    batch, offset = batch.slice(offset), 0
                yield _typed(batch, integers)
        except EngineInputError as exc:
            raise InvalidInput(str(exc), details={"uri": location["uri"], "reason": "data_changed"}) from exc


def _typed(batch: pa.RecordBatch, integers: set[str]) -> pa.RecordBatch:
    if not integers:
        return batch
    arrays = [
        column.cast(pa.int64()) if name in integers and not pa.types.is_integer(column.type) else column
        for name, column in zip(batch.schema.names, batch.columns, strict=True)
    ]
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)
