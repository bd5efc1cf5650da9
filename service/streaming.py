"""Streamed outputs of the batch paths: JSON Lines and CSV, rendered a batch at a time.

``POST /endpoints/{name}/predictions`` with a ``dataset_id`` and ``GET /models/{id}/assignments``
answer ``application/json`` (the default, bounded) or, per ``Accept``, a stream of one line per row:

* JSON Lines (``application/jsonlines``, SageMaker's name; ``application/x-jsonlines``,
  ``application/x-ndjson`` and ``application/jsonl`` are aliases, answered with the type asked for):
  ``{"key":"Alabama","closest_cluster":3,"distance_to_cluster":12.7}`` (plus ``"distances":[...]``
  when asked for);
* CSV (``text/csv``): a header row, then ``key,closest_cluster,distance_to_cluster`` (plus
  ``distances_0`` ... ``distances_{k-1}``); a key holding ``,``, ``"``, CR or LF is quoted (RFC 4180).

Lines are built with Arrow compute over whole columns (string concatenation, float-to-text casts),
never row by row in Python. Numbers are the shortest text that reads back to the same float64
(what orjson writes; an integral value keeps its ``.0``), keys are escaped exactly as JSON requires.

An error found after the first byte cannot change the status any more: the stream then ends with
one error line, in the API's error shape ``{"error": {"code", "message", "details",
"request_id"}}``: as it is in JSON Lines, after ``#error `` in CSV. The error is logged too.

Work is pipelined: :func:`ordered_map` keeps a few batches in flight on a small process-wide pool
(numpy and Arrow release the GIL), so reading, predicting and rendering use both cores while the
output order stays the input order and memory stays a few batches whatever the row count.
:func:`external_sort` orders any number of rows on disk (DuckDB over a spill file), for ``sort``.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import tempfile
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from service.engine.errors import EngineInputError
from service.error_body import error_body
from service.errors import AppError, NotAcceptable, PayloadTooLarge, storage_error

log = logging.getLogger("centroid.streaming")

JSON = "application/json"
JSONLINES = "application/jsonlines"
CSV = "text/csv"
#: JSON Lines under every name clients use for it; the answer carries the name asked for.
JSONLINES_TYPES = (JSONLINES, "application/x-jsonlines", "application/x-ndjson", "application/jsonl")
STREAMED_TYPES = (*JSONLINES_TYPES, CSV)
OFFERED_TYPES = (JSON, *STREAMED_TYPES)
CSV_ERROR_PREFIX = b"#error "

T = TypeVar("T")
R = TypeVar("R")

#: Batches computed at once per stream, on a pool as wide as the machine.
PIPELINE_DEPTH = max(2, os.cpu_count() or 2)
_POOL = ThreadPoolExecutor(max_workers=PIPELINE_DEPTH, thread_name_prefix="centroid-stream")


# --- content negotiation ------------------------------------------------------------------------


def negotiate(accept: str | None) -> str:
    """The media type to answer with: the acceptable type of highest quality (first listed on ties).

    No header, ``*/*`` or ``application/*`` give JSON; ``text/*`` gives CSV; q=0 excludes a type.
    Nothing acceptable: 406 naming the types offered.
    """
    if not accept or not accept.strip():
        return JSON
    ranked: list[tuple[float, int, str]] = []
    for position, part in enumerate(accept.split(",")):
        pieces = [piece.strip() for piece in part.split(";")]
        ranked.append((-_quality(pieces[1:]), position, pieces[0].lower()))
    for negative_quality, _, kind in sorted(ranked):
        if negative_quality >= 0:
            break
        if kind in ("*/*", "application/*"):
            return JSON
        if kind == "text/*":
            return CSV
        if kind in OFFERED_TYPES:
            return kind
    raise NotAcceptable(
        f"cannot respond with {accept[:200]!r}; acceptable: {', '.join(OFFERED_TYPES)}",
        details={"acceptable": list(OFFERED_TYPES)},
    )


def _quality(parameters: list[str]) -> float:
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                quality = float(value)
            except ValueError:
                return 0.0
            return min(max(quality, 0.0), 1.0) if math.isfinite(quality) else 0.0
    return 1.0


def is_streamed(media_type: str) -> bool:
    return media_type in STREAMED_TYPES


# --- rows to render -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RowBatch:
    """Predicted rows: keys (Arrow text), closest cluster, its distance, optionally every distance."""

    keys: pa.Array
    closest_cluster: np.ndarray  # (n,) integers
    distance_to_cluster: np.ndarray  # (n,) float64
    distances: np.ndarray | None = None  # (n, k) float64

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows: np.ndarray) -> RowBatch:
        """The rows at ``rows`` (positions), in that order."""
        return RowBatch(
            self.keys.take(pa.array(rows, pa.int64())),
            self.closest_cluster[rows],
            self.distance_to_cluster[rows],
            None if self.distances is None else self.distances[rows],
        )

    def slice(self, start: int, stop: int) -> RowBatch:
        return RowBatch(
            self.keys.slice(start, stop - start),
            self.closest_cluster[start:stop],
            self.distance_to_cluster[start:stop],
            None if self.distances is None else self.distances[start:stop],
        )


def concat_rows(batches: list[RowBatch]) -> RowBatch:
    """The rows of every batch, in order, as one batch."""
    if not batches:
        return RowBatch(pa.array([], pa.string()), np.empty(0, np.int64), np.empty(0, np.float64))
    every = [batch.distances for batch in batches]
    return RowBatch(
        pa.concat_arrays([batch.keys for batch in batches]),
        np.concatenate([batch.closest_cluster for batch in batches]),
        np.concatenate([batch.distance_to_cluster for batch in batches]),
        None if any(part is None for part in every) else np.concatenate(every),  # type: ignore[arg-type]
    )


def position_keys(first_row: int, rows: int) -> pa.Array:
    """Keys of a keyless dataset: each row's position, as text."""
    return pc.cast(pa.array(np.arange(first_row, first_row + rows, dtype=np.int64)), pa.string())


# --- formats ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineFormat:
    """How one streamed media type renders its header, its rows and a final error."""

    media_type: str
    csv: bool

    def header(self, k: int | None) -> bytes:
        """CSV's header row (with ``distances_0`` ... when ``k`` is given); nothing for JSON Lines."""
        if not self.csv:
            return b""
        names = ["key", "closest_cluster", "distance_to_cluster"]
        if k is not None:
            names += [f"distances_{cluster}" for cluster in range(k)]
        return (",".join(names) + "\n").encode()

    def rows(self, batch: RowBatch) -> bytes:
        """Every row of ``batch`` as one line each, in order."""
        if not len(batch):
            return b""
        lines = _csv_lines(batch) if self.csv else _json_lines(batch)
        return _text_bytes(lines)

    def error(self, body: dict[str, Any]) -> bytes:
        """The final line of a stream that failed: the API's error body."""
        line = orjson.dumps(body) + b"\n"
        return CSV_ERROR_PREFIX + line if self.csv else line


def line_format(media_type: str) -> LineFormat:
    if media_type not in STREAMED_TYPES:
        raise ValueError(f"{media_type!r} is not a streamed media type")
    return LineFormat(media_type, csv=media_type == CSV)


def _json_lines(batch: RowBatch) -> pa.Array:
    parts: list[Any] = [
        '{"key":"',
        json_string_content(batch.keys),
        _between(batch.closest_cluster, '","closest_cluster":', ',"distance_to_cluster":'),
        float_text(batch.distance_to_cluster),
    ]
    if batch.distances is not None:
        parts += [',"distances":[', _joined_floats(batch.distances), "]"]
    parts.append("}\n")
    return _concat(parts)


def _csv_lines(batch: RowBatch) -> pa.Array:
    parts: list[Any] = [
        csv_field(batch.keys),
        _between(batch.closest_cluster, ",", ","),
        float_text(batch.distance_to_cluster),
    ]
    if batch.distances is not None:
        parts += [",", _joined_floats(batch.distances)]
    parts.append("\n")
    return _concat(parts)


def _between(clusters: np.ndarray, before: str, after: str) -> pa.Array:
    """``before`` + the cluster + ``after`` for each row: a gather from the k possible texts (cheaper
    than formatting each integer and joining two more parts)."""
    labels = np.asarray(clusters, dtype=np.int64)
    if not len(labels):
        return pa.array([], pa.string())
    if labels.min() < 0:
        raise ValueError("cluster labels are never negative")
    return _cluster_texts(before, after, int(labels.max()) + 1).take(pa.array(labels))


@functools.lru_cache(maxsize=16)
def _cluster_texts(before: str, after: str, count: int) -> pa.Array:
    return pa.array([f"{before}{cluster}{after}" for cluster in range(count)], pa.string())


def _concat(parts: list[Any]) -> pa.Array:
    """Element-wise concatenation of text arrays and literal strings."""
    return pc.binary_join_element_wise(*parts, "")


def _joined_floats(matrix: np.ndarray) -> pa.Array:
    """Each row of ``matrix`` as its numbers joined by commas."""
    columns = [float_text(np.ascontiguousarray(matrix[:, column])) for column in range(matrix.shape[1])]
    return columns[0] if len(columns) == 1 else pc.binary_join_element_wise(*columns, ",")


def float_text(values: np.ndarray) -> pa.Array:
    """Finite float64 values as the shortest text that reads back to the same value.

    Arrow's cast writes the shortest round-trip digits, like orjson and ``repr``, but writes an
    integral value without a fraction (``3``): such values get ``.0`` so that every value reads as a
    float in every JSON and CSV reader. Only the (rare) integral values are looked at again.
    """
    floats = np.asarray(values, dtype=np.float64)
    text = pc.cast(pa.array(floats), pa.string())
    integral = floats == np.floor(floats)
    if not integral.any():
        return text
    rows = np.flatnonzero(integral)
    subset = text.take(pa.array(rows))
    plain = pc.match_substring_regex(subset, r"^-?[0-9]+$")
    fixed = pc.if_else(plain, pc.binary_join_element_wise(subset, ".0", ""), subset)
    return pc.replace_with_mask(text, pa.array(integral), fixed)


# --- exact escaping, touching only the keys that need it -----------------------------------------

_JSON_SPECIAL = np.zeros(256, dtype=bool)
_JSON_SPECIAL[:0x20] = True
_JSON_SPECIAL[[ord('"'), ord("\\")]] = True
_CSV_SPECIAL = np.zeros(256, dtype=bool)
_CSV_SPECIAL[[ord(","), ord('"'), ord("\r"), ord("\n")]] = True
_SHORT_ESCAPES = {0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r"}


def json_string_content(keys: pa.Array) -> pa.Array:
    """Each text as it goes between a JSON string's quotes (``"``, ``\\`` and U+0000-U+001F escaped).

    These characters are single bytes that never occur inside a multi-byte UTF-8 sequence, so the
    keys needing an escape are found with one numpy pass over the text's bytes; only those keys are
    rewritten, one Arrow replace per character present.
    """
    rows, found = _rows_with_bytes(keys, _JSON_SPECIAL)
    if not rows.size:
        return keys
    subset = keys.take(pa.array(rows))
    subset = pc.replace_substring(subset, "\\", "\\\\")  # first: the escapes below add backslashes
    subset = pc.replace_substring(subset, '"', '\\"')
    for byte in found:
        if byte < 0x20:
            subset = pc.replace_substring(subset, chr(byte), _SHORT_ESCAPES.get(byte, f"\\u{byte:04x}"))
    return _put_back(keys, rows, subset)


def csv_field(keys: pa.Array) -> pa.Array:
    """Each text as a CSV field: quoted (quotes doubled) when it holds ``,``, ``"``, CR or LF."""
    rows, _ = _rows_with_bytes(keys, _CSV_SPECIAL)
    if not rows.size:
        return keys
    subset = keys.take(pa.array(rows))
    subset = pc.binary_join_element_wise('"', pc.replace_substring(subset, '"', '""'), '"', "")
    return _put_back(keys, rows, subset)


def _rows_with_bytes(texts: pa.Array, special: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """(positions of the texts holding a ``special`` byte, the special bytes present)."""
    offsets, data = _offsets_and_data(texts)
    hits = np.flatnonzero(special[data])
    if not hits.size:
        return np.empty(0, dtype=np.int64), []
    rows = np.unique(np.searchsorted(offsets, hits + offsets[0], side="right") - 1)
    return rows.astype(np.int64), np.unique(data[hits]).tolist()


def _put_back(texts: pa.Array, rows: np.ndarray, replacements: pa.Array) -> pa.Array:
    mask = np.zeros(len(texts), dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(texts, pa.array(mask), replacements)


def _offsets_and_data(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The value offsets (len + 1) and the bytes they index, of a (large) string array, zero-copy."""
    large = pa.types.is_large_string(texts.type)
    if not (large or pa.types.is_string(texts.type)):
        raise TypeError(f"expected text, got {texts.type}")
    _validity, offset_buffer, data_buffer = texts.buffers()
    offsets = np.frombuffer(offset_buffer, dtype=np.int64 if large else np.int32)
    offsets = offsets[texts.offset : texts.offset + len(texts) + 1].astype(np.int64)
    if data_buffer is None:
        return offsets, np.empty(0, dtype=np.uint8)
    data = np.frombuffer(data_buffer, dtype=np.uint8)[offsets[0] : offsets[-1]]
    return offsets, data


def _text_bytes(lines: pa.Array) -> bytes:
    """The concatenation of every text of ``lines``: its data buffer, copied once."""
    _, data = _offsets_and_data(lines)
    return data.tobytes()


# --- pipelining and the stream itself -----------------------------------------------------------


def ordered_map(work: Callable[[T], R], items: Iterable[T], depth: int = PIPELINE_DEPTH) -> Iterator[R]:
    """``work`` over ``items`` on the process-wide pool, ``depth`` items in flight, results in order.

    ``items`` is consumed in the calling thread (a Parquet reader is sequential); an error in
    ``work`` is raised when its result's turn comes. Closing the iterator cancels what has not
    started; results still being computed are dropped.
    """
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(_POOL.submit(work, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def stream_lines(
    chunks: Iterable[tuple[bytes, int]],
    line_format: LineFormat,
    *,
    header: bytes,
    what: str,
    request_id: str | None,
    on_done: Callable[[int], None] | None = None,
) -> Generator[bytes, None, None]:
    """The response body: ``header``, each chunk (rendered lines, their row count), and on failure
    one error line (logged).

    ``on_done`` gets the number of rows sent when the stream ends for whatever reason (finished,
    failed, or the client went away).
    """
    rows = 0
    try:
        if header:
            yield header
        for chunk, count in chunks:
            rows += count
            yield chunk
    except Exception as exc:  # noqa: BLE001 - the status is sent: the stream itself must say it failed
        yield line_format.error(_error_body(exc, what, rows, request_id))
    finally:
        if on_done is not None:
            on_done(rows)


def _error_body(exc: Exception, what: str, rows: int, request_id: str | None) -> dict[str, Any]:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a sort's spill file
        exc = storage_error(exc, f"the rows of {what} to sort them")
    if isinstance(exc, AppError):
        code, message, details = exc.code, exc.message, exc.details
    elif isinstance(exc, EngineInputError):  # data the engine cannot use (the same 400 as elsewhere)
        code, message, details = "invalid_input", str(exc), None
    else:
        log.error("stream of %s failed after %d rows", what, rows, exc_info=exc)
        return error_body("internal_error", "internal server error", {"rows_sent": rows}, request_id)
    level = logging.ERROR if isinstance(exc, AppError) and exc.status_code >= 500 else logging.WARNING
    log.log(level, "stream of %s ended with an error after %d rows: %s: %s", what, rows, code, message)
    details = {**details, "rows_sent": rows} if isinstance(details, dict) else {"rows_sent": rows, "details": details}
    return error_body(code, message, details, request_id)


def slices(batch: RowBatch, rows: int) -> Iterator[RowBatch]:
    """``batch`` in consecutive pieces of at most ``rows`` rows."""
    for start in range(0, len(batch), rows):
        yield batch.slice(start, min(start + rows, len(batch)))


# --- sorting any number of rows ---------------------------------------------------------------

#: DuckDB's memory for an external sort (it spills to disk beyond): 64 MB failed on 10M rows.
SORT_MEMORY_LIMIT = "128MB"
#: One thread sorts 10M rows as fast as two here, in less memory (the rows were predicted on both cores).
SORT_THREADS = 1
_SORT_COLUMNS = {"key": "key", "cluster": "closest_cluster", "distance": "distance_to_cluster"}


def external_sort(
    batches: Iterable[RowBatch], sort: str, k: int | None, batch_rows: int, directory: Path
) -> Iterator[RowBatch]:
    """``batches``' rows in ``sort`` order (e.g. ``cluster,-distance``), whatever their number.

    The rows are spilled to a Parquet file in a scratch directory under ``directory``, sorted by
    DuckDB within :data:`SORT_MEMORY_LIMIT` (it spills to the same directory beyond), and read back
    ``batch_rows`` at a time. Ties keep the input order, as :func:`~service.endpoints.serving.sort_order`
    does (descending fields too). ``k``: the width of ``distances``, when the rows carry them. The
    scratch directory goes when the iterator is exhausted or closed.
    """
    import duckdb

    with tempfile.TemporaryDirectory(prefix=".tmp-sort-", dir=directory) as scratch:
        spill = Path(scratch) / "rows.parquet"
        rows = _spill(batches, spill, k)
        distances = [f'"distances_{cluster}"' for cluster in range(k or 0)]
        columns = ", ".join(['"key"', '"closest_cluster"', '"distance_to_cluster"', *distances])
        query = f'SELECT {columns} FROM read_parquet(?) ORDER BY {_order_by(sort)}, "row" ASC'
        config = {
            "memory_limit": SORT_MEMORY_LIMIT,
            "threads": SORT_THREADS,
            "temp_directory": scratch,
            "preserve_insertion_order": False,  # ORDER BY ends with the row number: the order is total
        }
        connection = duckdb.connect(config=config)  # type: ignore[arg-type]
        try:
            for batch in connection.sql(query, params=[str(spill)]).to_arrow_reader(batch_rows):
                yield _sorted_batch(batch, k)
        except (duckdb.OutOfMemoryException, OSError) as exc:
            if "Out of Memory" not in str(exc):
                raise
            raise PayloadTooLarge(
                f"sorting {rows} rows needs more memory than a request may use ({SORT_MEMORY_LIMIT}); "
                "leave `sort` out and sort on your side",
                details={"rows": rows, "sort": sort},
            ) from exc
        finally:
            connection.close()


def _order_by(sort: str) -> str:
    """``sort`` (validated fields, ``-`` for descending) as an ORDER BY list."""
    terms = []
    for part in (piece.strip() for piece in sort.split(",")):
        column = _SORT_COLUMNS[part.lstrip("-")]
        terms.append(f'"{column}" {"DESC" if part.startswith("-") else "ASC"}')
    return ", ".join(terms)


def _spill(batches: Iterable[RowBatch], path: Path, k: int | None) -> int:
    """Write the rows, numbered, to a Parquet file; their number."""
    fields = [("row", pa.int64()), ("key", pa.string()), ("closest_cluster", pa.int64())]
    fields += [("distance_to_cluster", pa.float64())] + [(f"distances_{c}", pa.float64()) for c in range(k or 0)]
    schema = pa.schema(fields)
    first = 0
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for batch in batches:
            columns = [
                pa.array(np.arange(first, first + len(batch), dtype=np.int64)),
                batch.keys.cast(pa.string()),
                pa.array(np.asarray(batch.closest_cluster, dtype=np.int64)),
                pa.array(batch.distance_to_cluster),
            ]
            if k:
                assert batch.distances is not None
                columns += [pa.array(np.ascontiguousarray(batch.distances[:, c])) for c in range(k)]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
            first += len(batch)
    return first


def _sorted_batch(batch: pa.RecordBatch, k: int | None) -> RowBatch:
    keys = batch.column(0)
    every = np.column_stack([batch.column(3 + c).to_numpy(zero_copy_only=False) for c in range(k)]) if k else None
    return RowBatch(
        keys if pa.types.is_string(keys.type) else keys.cast(pa.string()),
        batch.column(1).to_numpy(zero_copy_only=False),
        batch.column(2).to_numpy(zero_copy_only=False),
        every,
    )


def streamed_content(line_example: str, csv_example: str, line_description: str) -> dict[str, Any]:
    """OpenAPI ``content`` entries of the streamed media types of a 200 response."""
    jsonlines = {
        "schema": {"type": "string", "description": line_description},
        "example": line_example,
    }
    csv = {"schema": {"type": "string", "description": "A header row, then one row per line."}, "example": csv_example}
    return {**{kind: jsonlines for kind in JSONLINES_TYPES}, CSV: csv}
