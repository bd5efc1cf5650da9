"""Batch sources: how training data reaches the engine without being loaded whole.

The engine only ever holds one mini-batch of the data, so a source must be able to replay the data
in batches as often as asked (one pass per epoch, plus an initialization read and an evaluation
pass). :class:`ArrayBatchSource` wraps an in-memory matrix; :class:`ParquetBatchSource` streams a
Parquet file; :class:`FilesBatchSource` streams a list of Parquet or CSV files through a pyarrow
filesystem (S3, local disk, ...), one file after the other. All yield exactly ``batch_size`` rows per
batch (the last one may be shorter), so the same data gives the same batches, and thus the same
model, whatever its storage.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from os import PathLike
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
from numpy.typing import ArrayLike

from service.engine.errors import EngineInputError

_NUMERIC_KINDS = "biuf"


@runtime_checkable
class BatchSource(Protocol):
    """Re-iterable data: every ``batches`` call starts a fresh pass over the same rows, in order."""

    @property
    def n_rows(self) -> int: ...

    @property
    def n_features(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield (rows, n_features) arrays of at most ``batch_size`` rows covering all rows once."""
        ...


class ArrayBatchSource:
    """An in-memory 2-D array (numpy, pandas, nested lists) served in row slices without copying."""

    def __init__(self, data: ArrayLike) -> None:
        array = np.asarray(data)
        if array.ndim != 2:
            raise EngineInputError(f"data must be a 2-D matrix (rows x features), got {array.ndim}-D")
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise EngineInputError(f"data must be numeric, got dtype {array.dtype}")
        self._data = array

    @property
    def n_rows(self) -> int:
        return int(self._data.shape[0])

    @property
    def n_features(self) -> int:
        return int(self._data.shape[1])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.n_rows, batch_size):
            yield self._data[start : start + batch_size]


class ParquetBatchSource:
    """Numeric columns of a Parquet file, streamed with ``ParquetFile.iter_batches``.

    Parquet batches stop at row-group boundaries, so they are re-cut to exactly ``batch_size`` rows:
    training on the file then matches training on the same matrix in memory bit for bit. Memory
    is about one row group plus one batch, so write files with moderate row groups.
    """

    def __init__(self, path: str | PathLike[str], columns: Sequence[str] | None = None) -> None:
        self._path = path
        with pq.ParquetFile(path) as file:
            schema = file.schema_arrow
            self._n_rows = int(file.metadata.num_rows)
        self._columns = list(schema.names if columns is None else columns)
        _check_columns(schema, self._columns)

    @property
    def n_rows(self) -> int:
        return self._n_rows

    @property
    def n_features(self) -> int:
        return len(self._columns)

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        # pre_buffer (pyarrow's default) caches every row group read so far: memory would grow
        # with the file instead of staying at one row group.
        with pq.ParquetFile(self._path, pre_buffer=False) as file:
            chunks = file.iter_batches(batch_size=batch_size, columns=self._columns)
            yield from rebatch((self._to_numpy(chunk) for chunk in chunks), batch_size)

    def _to_numpy(self, batch: pa.RecordBatch) -> np.ndarray:
        return _to_numpy(batch, self._columns)


def _to_numpy(batch: pa.RecordBatch, columns: Sequence[str]) -> np.ndarray:
    matrix = np.empty((batch.num_rows, batch.num_columns), dtype=np.float64)
    for index, column in enumerate(batch.columns):
        if column.null_count:
            raise EngineInputError(f"column {columns[index]!r} contains null values")
        matrix[:, index] = column.to_numpy(zero_copy_only=False)
    return matrix


@dataclass(frozen=True)
class CsvLayout:
    """How to read a set of CSV files: pyarrow's own options, the same for every file.

    ``convert`` should fix ``column_types`` (so every file is read with the same types, whatever
    its first block holds); the source adds ``include_columns`` itself.
    """

    read: pa_csv.ReadOptions
    parse: pa_csv.ParseOptions
    convert: pa_csv.ConvertOptions


class FilesBatchSource:
    """Numeric columns of Parquet or CSV files read through a pyarrow filesystem, one file after
    the other, in the order given (S3 through ``pyarrow.fs.S3FileSystem``, or local files).

    ``rows_per_path`` is what each file held when it was described to the caller (from a Parquet
    footer, or counted): a file that holds another number of rows when read is an error naming it,
    so data that changed under the caller never trains silently. Memory is one Parquet row group
    or one CSV block, plus one batch, whatever the number of rows (batches are re-cut across files
    to exactly ``batch_size`` rows, so the same rows give the same batches as any other source).
    """

    def __init__(
        self,
        filesystem: pa_fs.FileSystem,
        paths: Sequence[str],
        columns: Sequence[str],
        *,
        file_format: Literal["parquet", "csv"],
        rows_per_path: Sequence[int],
        csv: CsvLayout | None = None,
        check_numeric: bool = True,
    ) -> None:
        """``check_numeric=False`` lets :meth:`record_batches` read text columns too (for readers
        other than training: :meth:`batches` always needs numbers)."""
        if len(paths) != len(rows_per_path):
            raise EngineInputError(f"{len(paths)} files but {len(rows_per_path)} row counts")
        if file_format == "csv" and csv is None:
            raise EngineInputError("CSV files need a CsvLayout")
        if not columns:
            raise EngineInputError("no feature columns selected")
        self._filesystem = filesystem
        self._paths = list(paths)
        self._rows = [int(n) for n in rows_per_path]
        self._columns = list(columns)
        self._format = file_format
        self._csv = csv
        self._check_numeric = check_numeric

    @property
    def n_rows(self) -> int:
        return sum(self._rows)

    @property
    def n_features(self) -> int:
        return len(self._columns)

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def record_batches(self, batch_rows: int) -> Iterator[pa.RecordBatch]:
        """The columns (in the order asked) as Arrow record batches of at most ``batch_rows`` rows
        (batches do not straddle files). Raises EngineInputError for a column that is missing or
        not numeric, or a file whose row count changed; pyarrow's OSError for a file that cannot
        be read (gone, access denied) and ArrowInvalid for a CSV value that is not of its type."""
        for path, expected in zip(self._paths, self._rows, strict=True):
            seen = 0
            with closing(self._file_batches(path, batch_rows)) as batches:
                for batch in batches:
                    seen += batch.num_rows
                    if seen > expected:
                        break
                    yield batch
            if seen != expected:
                raise EngineInputError(
                    f"{path} holds {'more than ' if seen > expected else ''}{seen} rows; it held {expected} when "
                    "the dataset was registered (the data changed: register it again)"
                )

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        chunks = (_to_numpy(batch, self._columns) for batch in self.record_batches(batch_size))
        yield from rebatch(chunks, batch_size)

    def _check(self, schema: pa.Schema, path: str) -> None:
        if self._check_numeric:
            _check_columns(schema, self._columns, where=path)
            return
        missing = [name for name in self._columns if schema.get_field_index(name) < 0]
        if missing:
            raise EngineInputError(f"columns not in {path}: {missing}")

    def _file_batches(self, path: str, batch_rows: int) -> Generator[pa.RecordBatch, None, None]:
        if self._format == "parquet":
            with self._filesystem.open_input_file(path) as handle, pq.ParquetFile(handle, pre_buffer=False) as file:
                self._check(file.schema_arrow, path)
                for batch in file.iter_batches(batch_size=batch_rows, columns=self._columns, use_threads=False):
                    yield batch.select(self._columns)
            return
        assert self._csv is not None
        convert = self._csv.convert
        options = pa_csv.ConvertOptions(
            check_utf8=convert.check_utf8,
            column_types=convert.column_types,
            null_values=convert.null_values,
            true_values=convert.true_values,
            false_values=convert.false_values,
            decimal_point=convert.decimal_point,
            strings_can_be_null=convert.strings_can_be_null,
            quoted_strings_can_be_null=convert.quoted_strings_can_be_null,
            include_columns=self._columns,
            include_missing_columns=False,
        )
        with self._filesystem.open_input_stream(path, compression=None) as stream:
            reader = pa_csv.open_csv(
                stream, read_options=self._csv.read, parse_options=self._csv.parse, convert_options=options
            )
            self._check(reader.schema, path)
            for batch in reader:
                for start in range(0, batch.num_rows, batch_rows):
                    yield batch.slice(start, batch_rows).select(self._columns)


def _check_columns(schema: pa.Schema, columns: list[str], where: str = "the Parquet file") -> None:
    """The columns exist and are numbers (``where`` names the file in the messages)."""
    if not columns:
        raise EngineInputError("no feature columns selected")
    missing = [name for name in columns if schema.get_field_index(name) < 0]
    if missing:
        raise EngineInputError(f"columns not in {where}: {missing}")
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
    bad = [name for name in columns if not any(test(schema.field(name).type) for test in numeric)]
    if bad:
        raise EngineInputError(f"columns are not numeric in {where}: {bad}")


def rebatch(chunks: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of row chunks into batches of exactly ``batch_size`` rows (bar the last)."""
    pending: list[np.ndarray] = []
    count = 0
    for chunk in chunks:
        while len(chunk):
            take = min(batch_size - count, len(chunk))
            pending.append(chunk[:take])
            chunk = chunk[take:]
            count += take
            if count == batch_size:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, count = [], 0
    if count:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def as_batch_source(data: BatchSource | ArrayLike) -> BatchSource:
    """Use ``data`` as-is if it is a BatchSource, otherwise wrap it as an in-memory matrix."""
    return data if isinstance(data, BatchSource) else ArrayBatchSource(data)


def checked_batches(source: BatchSource, batch_size: int, what: str = "training") -> Generator[np.ndarray, None, None]:
    """Yield the source's batches as C-contiguous float64, rejecting malformed or non-finite data.

    A completed pass must also deliver exactly ``source.n_rows`` rows, which progress totals and
    the ``k <= rows`` check rely on.
    """
    seen = 0
    for index, batch in enumerate(source.batches(batch_size)):
        array = _as_float_batch(batch, source.n_features, batch_size, f"{what} batch {index}")
        check_finite(array, f"{what} batch {index}", seen)
        seen += len(array)
        yield array
    if seen != source.n_rows:
        raise EngineInputError(f"{what} data declared {source.n_rows} rows but yielded {seen}")


def _as_float_batch(batch: object, n_features: int, batch_size: int, where: str) -> np.ndarray:
    try:
        array = np.ascontiguousarray(batch, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EngineInputError(f"{where}: values are not numeric ({exc})") from exc
    if array.ndim != 2 or array.shape[1] != n_features:
        raise EngineInputError(f"{where}: expected (rows, {n_features}) values, got shape {array.shape}")
    if len(array) > batch_size:
        raise EngineInputError(f"{where}: {len(array)} rows, more than the batch size {batch_size}")
    return array


def check_finite(array: np.ndarray, where: str, first_row: int) -> None:
    """Raise EngineInputError naming the first NaN/inf (row numbers offset by ``first_row``)."""
    finite = np.isfinite(array)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise EngineInputError(
            f"{where}: non-finite value {array[row, column]} at row {first_row + row}, column {column}"
        )
