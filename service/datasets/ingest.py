"""Streaming, column-wise CSV ingest: a spooled upload becomes a typed Parquet file in bounded memory.

The rules are those of the original parser (``tests/datasets/oracle.py`` keeps it, as the oracle the
property tests compare against):

* every cell is text first; a cell that is empty or only whitespace (Python's ``str.strip`` set)
  is null;
* a column whose present cells all read as numbers (``1210.5``, ``"1,210.5"``, ``-3``, ``.5``,
  ``1e-3``, Unicode digits) is numeric: ``int64`` when every cell is an integer literal, none is null
  and all are below 2**53, else ``float64``; ``nan``/``inf`` literals and numbers too large for a
  float are refused naming the column and the row (a literal before an overflow, columns in order);
* the key column is text, trimmed, and must label every row exactly once; other text columns keep
  their cells exactly as sent.

How it runs: the file is read in blocks of a few megabytes, each turned into Arrow arrays and
written as Parquet row groups (on a second thread) before many more are read, so memory does not
grow with the file. Column types are *assumed* from the first block and checked on every block; a
block that contradicts an assumption (an integer column holding ``2.5``, a number column holding
text) restarts the pass with the weaker type, at most twice per column. Two tokenizers:

* pyarrow's streaming, multithreaded CSV reader (quoted fields and line breaks inside quotes
  included), numeric columns converted to ``float64`` by the reader itself: its number syntax, after
  trimming blanks, is the one above except ``nan``/``inf``, which send the column to the exact path;
  it splits fields exactly as pandas does, odd quoting included (the property tests hold it to that);
* pandas' C tokenizer in chunks, the original parser's own, for what pyarrow refuses or reads
  otherwise: a row with fewer fields (the original parser padded it with nulls), a file ending inside
  a quoted field (refused), a one-column file (a line of blanks is skipped, not a null row).

The exact path types string arrays with pyarrow compute (RE2 for ASCII cells, Python's ``re`` for the
rare non-ASCII ones, so ``\\d`` keeps Python's Unicode meaning).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from service.datasets.columnar import pandas_schema
from service.datasets.parsing import NUMBER_PATTERN, check_column_names
from service.datasets.progress import Progress
from service.errors import InvalidInput, storage_error

# Python's str.strip() removes exactly the characters for which str.isspace() is true.
PY_WHITESPACE = "".join(chr(code) for code in range(0x110000) if chr(code).isspace())
_NUMBER_RE2 = f"^{NUMBER_PATTERN}$"  # RE2: \d is [0-9]; non-ASCII cells use Python's re instead
_INTEGER_RE2 = r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)$"
_NON_FINITE_RE2 = r"(?i)^[+-]?(?:nan|inf|infinity)$"
_NUMBER = re.compile(f"^{NUMBER_PATTERN}$")
_INTEGER = re.compile(_INTEGER_RE2)
_NON_FINITE = re.compile(_NON_FINITE_RE2)
_INT64_LIMIT = 2**53
BLOCK_BYTES = 4 << 20  # pyarrow's streaming reader parses blocks of this size
PIECE_BYTES = 4 << 20  # the file is read in pieces of this size, each parsed as one block
PARSERS = 2  # pieces parsed at once, each on a thread of its own
PROBE_ROWS = 2000  # column types are assumed from this many first rows
WRITES_IN_FLIGHT = 2  # row groups queued for the writer thread before the parser waits
SYNC_BYTES = 64 << 20  # the Parquet file is flushed to disk as it grows, so publishing it is quick
MAX_BLOCK_BYTES = 256 << 20  # a row longer than a block needs bigger blocks, up to this
TAIL_BYTES = 1 << 20  # how much of the file's end is read to see whether its last line is whole
PROBE_BYTES = 1 << 20  # the first rows, parsed to assume column types, are read from this much
PANDAS_CHUNK_BYTES = 8 << 20
MAX_HEADER_BYTES = 64 << 20
_RESTARTS_PER_COLUMN = 3


class Kind(StrEnum):
    """A column's type as stored: the key, text, or a number type."""

    KEY = "key"
    TEXT = "text"
    INT = "int"
    FLOAT = "float"

    @property
    def dtype(self) -> str:
        return {"key": "string", "text": "string", "int": "int64", "float": "float64"}[self.value]


@dataclass
class ColumnPlan:
    """What a pass assumes of a column, and how the fast reader should read it."""

    name: str
    kind: Kind
    read_double: bool = False  # the fast reader converts it to float64 itself


@dataclass
class ColumnFindings:
    """Per column, the first refused number (kept until the pass ends: a later text cell makes the
    column text and the value harmless)."""

    non_finite: tuple[int, str] | None = None
    overflow: tuple[int, str] | None = None


class _Restart(Exception):
    """A piece contradicted an assumption: run the pass again with the new plan."""

    def __init__(self, position: int, kind: Kind | None = None, read_double: bool | None = None) -> None:
        super().__init__(position, kind, read_double)
        self.position, self.kind, self.read_double = position, kind, read_double


class _NeedExactTokenizer(Exception):
    """The fast reader refused the file's structure; the pandas tokenizer decides."""


@dataclass(frozen=True)
class IngestResult:
    header: list[str]
    columns: list[dict[str, str]]  # [{name, dtype}]
    row_count: int
    summary: list[dict[str, Any]]
    key_ascending: bool = False  # every key greater than the one before: unique without a hash check


# --- the spooled upload ------------------------------------------------------------------------


@dataclass
class SpoolFacts:
    """What was learnt about the bytes while they were written to disk."""

    size: int = 0
    has_quote: bool = False
    has_content: bool = False  # a byte other than ASCII whitespace
    nul_offset: int | None = None
    utf8_error_offset: int | None = None


class CsvSpool:
    """Writes an upload to a file as it arrives, checking it on the way (NUL bytes, UTF-8, quotes).

    The checks cost one pass over bytes already in memory; nothing is kept but the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.facts = SpoolFacts()
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._decoder = _Utf8Checker()

    def write(self, chunk: bytes) -> None:
        facts = self.facts
        if not chunk:
            return
        if facts.nul_offset is None:
            position = chunk.find(b"\x00")
            if position >= 0:
                facts.nul_offset = facts.size + position
        if not facts.has_quote and b'"' in chunk:
            facts.has_quote = True
        if not facts.has_content and chunk.strip():
            facts.has_content = True
        if facts.utf8_error_offset is None:
            facts.utf8_error_offset = self._decoder.feed(chunk, facts.size)
        try:
            self._file.write(chunk)
        except OSError as exc:  # a full disk is a 507, as for any write to the artifact store
            raise storage_error(exc, self.path.name) from exc
        facts.size += len(chunk)

    def close(self) -> SpoolFacts:
        if not self._file.closed:
            if self.facts.utf8_error_offset is None:
                self.facts.utf8_error_offset = self._decoder.finish(self.facts.size)
            self._file.close()
        return self.facts

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


class _Utf8Checker:
    """Incremental UTF-8 validation giving the offset of the first invalid byte (a BOM is valid UTF-8)."""

    def __init__(self) -> None:
        import codecs

        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def feed(self, chunk: bytes, offset: int) -> int | None:
        if chunk.isascii() and not self._decoder.getstate()[0]:
            return None  # ASCII is UTF-8, and nothing is pending from the previous chunk
        try:
            self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            pending = len(self._decoder.getstate()[0])
            return offset - pending + exc.start
        return None

    def finish(self, offset: int) -> int | None:
        pending = len(self._decoder.getstate()[0])
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            return offset - pending + exc.start
        return None


def check_spool(facts: SpoolFacts) -> None:
    """The original parser's checks on the raw bytes, in its order."""
    if facts.nul_offset is not None:
        raise InvalidInput("the file is not CSV text (it contains NUL bytes)")
    if not facts.has_content:
        raise InvalidInput("the file is empty")
    if facts.utf8_error_offset is not None:
        offset = facts.utf8_error_offset
        raise InvalidInput(f"the file is not UTF-8 text (invalid byte at offset {offset})", details={"offset": offset})


# --- header ------------------------------------------------------------------------------------


def read_header(path: Path, delimiter: str, max_columns: int) -> list[str]:
    """The header row's names (trimmed, checked), reading no more of the file than that row."""
    with open(path, "rb") as raw:
        first = _first_line(raw)
    count = first.count(delimiter.encode())
    if b'"' not in first and count >= max_columns:
        # An unquoted first line: its delimiters count the columns exactly, so a header of a
        # million columns is refused without building a list of a million names.
        columns = count + 1
        raise InvalidInput(
            f"the file has {columns} columns; at most {max_columns} are allowed",
            details={"columns": columns, "limit": max_columns},
        )
    with open(path, encoding="utf-8-sig", errors="ignore", newline="") as text:
        try:
            header = next(csv.reader(text, delimiter=delimiter))
        except (StopIteration, csv.Error) as exc:
            raise InvalidInput(f"the file is not valid CSV: cannot read a header row ({exc})") from exc
    if len(header) > max_columns:
        raise InvalidInput(
            f"the file has {len(header)} columns; at most {max_columns} are allowed",
            details={"columns": len(header), "limit": max_columns},
        )
    names = [name.strip() for name in header]
    check_column_names(names)
    return names


def _first_line(raw: BinaryIO) -> bytes:
    """The file's first physical line (without its BOM), read in blocks, at most MAX_HEADER_BYTES."""
    head = b""
    while len(head) < MAX_HEADER_BYTES:
        block = raw.read(1 << 16)
        if not block:
            break
        head += block
        if b"\n" in block or b"\r" in block:
            break
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    ends = [i for i in (head.find(b"\n"), head.find(b"\r")) if i >= 0]
    return head[: min(ends, default=len(head))]


def check_key_column(names: Sequence[str], key_column: str | None) -> None:
    if key_column is not None and key_column not in names:
        raise InvalidInput(
            f"key column {key_column!r} is not one of the columns",
            details={"key_column": key_column, "columns": list(names)},
        )


# --- typing pieces -----------------------------------------------------------------------------


def _bool(array: pa.Array) -> np.ndarray:
    """A boolean Arrow array as numpy, null as False."""
    return np.asarray(array.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _trimmed(exact: pa.Array) -> pa.Array:
    """Cells trimmed as Python's str.strip() does; empty (or all-blank) cells are null."""
    trimmed = pc.utf8_trim(exact, characters=PY_WHITESPACE)
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)


def blank_to_null(exact: pa.Array) -> pa.Array:
    """Text cells as sent, except that an empty or all-blank cell is null."""
    blank = pc.equal(pc.utf8_trim(exact, characters=PY_WHITESPACE), "")
    return pc.if_else(blank, pa.scalar(None, pa.string()), exact)


class ChunkTyper:
    """Types pieces of text columns under a plan, recording what must be refused at the end."""

    def __init__(self, plans: list[ColumnPlan]) -> None:
        self.plans = plans
        self.findings = [ColumnFindings() for _ in plans]
        self.key_ascending = True
        self._last_key: str | None = None

    def type_piece(self, arrays: Sequence[pa.Array], offset: int) -> list[pa.Array]:
        out: list[pa.Array] = []
        for position, (plan, array) in enumerate(zip(self.plans, arrays, strict=True)):
            if pa.types.is_floating(array.type):
                out.append(self._checked_double(position, array))
            else:
                out.append(self._typed(position, plan, _as_string(array), offset))
        return out

    def _checked_double(self, position: int, values: pa.Array) -> pa.Array:
        """A column the fast reader converted: any nan/inf needs the exact path's errors."""
        total = pc.sum(values).as_py()  # nan and inf make the sum non-finite (and so may a huge one)
        if total is not None and not math.isfinite(total) and not pc.all(pc.is_finite(values)).as_py():
            raise _Restart(position, read_double=False)
        return values

    def _typed(self, position: int, plan: ColumnPlan, exact: pa.Array, offset: int) -> pa.Array:
        if plan.kind is Kind.TEXT:
            return blank_to_null(exact)
        trimmed = _trimmed(exact)
        if plan.kind is Kind.KEY:
            self._follow_key(trimmed)
            return trimmed
        present = ~np.asarray(trimmed.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        is_number = _bool(pc.match_substring_regex(trimmed, _NUMBER_RE2))
        is_non_finite = _bool(pc.match_substring_regex(trimmed, _NON_FINITE_RE2))
        non_ascii = present & ~_bool(pc.string_is_ascii(trimmed))
        unicode_rows = np.flatnonzero(non_ascii)
        unicode_cells = trimmed.take(pa.array(unicode_rows)).to_pylist() if unicode_rows.size else []
        for row, cell in zip(unicode_rows, unicode_cells, strict=True):
            is_number[row] = _NUMBER.match(cell) is not None
            is_non_finite[row] = _NON_FINITE.match(cell) is not None
        if (present & ~is_number & ~is_non_finite).any():
            raise _Restart(position, kind=Kind.TEXT)
        if plan.kind is Kind.INT:
            is_integer = _bool(pc.match_substring_regex(trimmed, _INTEGER_RE2))
            for row, cell in zip(unicode_rows, unicode_cells, strict=True):
                is_integer[row] = _INTEGER.match(cell) is not None
            if not present.all() or not is_integer.all():
                raise _Restart(position, kind=Kind.FLOAT)
        ascii_numbers = is_number & ~non_ascii
        digits = pc.replace_substring(trimmed, ",", "")
        candidates = pc.if_else(pa.array(ascii_numbers), digits, pa.scalar(None, pa.string()))
        values = pc.cast(candidates, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
        for row, cell in zip(unicode_rows, unicode_cells, strict=True):
            if is_number[row]:
                values[row] = float(cell.replace(",", ""))
        numbers = values[is_number]
        self._record(position, trimmed, offset, is_non_finite, is_number & ~np.isfinite(np.where(is_number, values, 0)))
        if plan.kind is Kind.INT:
            if numbers.size and not (np.abs(numbers).max() < _INT64_LIMIT):
                raise _Restart(position, kind=Kind.FLOAT)
            return pa.array(values.astype(np.int64))
        return pa.array(values, mask=~is_number, type=pa.float64())

    def _record(
        self, position: int, trimmed: pa.Array, offset: int, non_finite: np.ndarray, overflow: np.ndarray
    ) -> None:
        findings = self.findings[position]
        if findings.non_finite is None and non_finite.any():
            row = int(np.argmax(non_finite))
            findings.non_finite = (offset + row, trimmed[row].as_py())
        if findings.overflow is None and overflow.any():
            row = int(np.argmax(overflow))
            findings.overflow = (offset + row, trimmed[row].as_py())

    def _follow_key(self, keys: pa.Array) -> None:
        """Whether the keys so far are strictly ascending (then they are unique: no hash check).
        A null key ends it too: the full key check then names its row."""
        if not self.key_ascending or len(keys) == 0:
            return
        ascending = keys.null_count == 0 and (
            len(keys) == 1 or pc.all(pc.less(keys.slice(0, len(keys) - 1), keys.slice(1))).as_py()
        )
        first = keys[0].as_py()
        if not ascending or (self._last_key is not None and not self._last_key < first):
            self.key_ascending = False
            return
        self._last_key = keys[len(keys) - 1].as_py()

    def raise_findings(self) -> None:
        """Refuse the first column (in order) holding a non-finite literal, or else an overflow."""
        for plan, findings in zip(self.plans, self.findings, strict=True):
            if plan.kind not in (Kind.INT, Kind.FLOAT):
                continue
            found = findings.non_finite or findings.overflow
            if found is not None:
                raise_non_finite(plan.name, *found)


def raise_non_finite(column: str, row: int, text: str) -> None:
    text = text if len(text) <= 64 else f"{text[:30]}...({len(text)} characters)"  # no megabyte error bodies
    raise InvalidInput(
        f"column {column!r} row {row}: {text!r} is not a finite number",
        details={"column": column, "row": int(row), "value": text},
    )


def _as_string(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    if array.type != pa.string():
        array = array.cast(pa.string())
    return array


def assume_plans(names: Sequence[str], key_column: str | None, first: Sequence[pa.Array]) -> list[ColumnPlan]:
    """Column types as the first piece suggests (checked, and weakened if need be, on every piece)."""
    plans = []
    first = [array.slice(0, PROBE_ROWS) for array in first]  # a sample: later rows are checked anyway
    for name, array in zip(names, first, strict=True):
        if name == key_column:
            plans.append(ColumnPlan(name, Kind.KEY))
            continue
        kind = Kind.INT
        typer = ChunkTyper([ColumnPlan(name, Kind.INT)])
        for candidate in (Kind.INT, Kind.FLOAT):
            typer.plans[0].kind = candidate
            try:
                typer.type_piece([_as_string(array)], 0)
                kind = candidate
                break
            except _Restart as restart:
                kind = restart.kind or Kind.FLOAT
                if kind is Kind.TEXT:
                    break
        plans.append(ColumnPlan(name, kind, read_double=kind is Kind.FLOAT))
    return plans


# --- summaries ---------------------------------------------------------------------------------


@dataclass
class _Moments:
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations (Chan et al.'s parallel merge)


@dataclass
class SummaryBuilder:
    """Per-column count, nulls, min, max, mean and sample std of a Parquet file being written.

    Means and variances are accumulated piece by piece (C++ kernels); counts, nulls, min and max
    come from the row-group statistics the Parquet writer keeps anyway, so they cost nothing.
    """

    columns: list[dict[str, str]]
    moments: list[_Moments] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.moments = [_Moments() for _ in self.columns]

    def add(self, arrays: Sequence[pa.Array | pa.ChunkedArray]) -> None:
        for column, moments, array in zip(self.columns, self.moments, arrays, strict=True):
            present = len(array) - array.null_count
            if column["dtype"] == "string" or present == 0:
                continue
            values = array.cast(pa.float64()) if array.type != pa.float64() else array
            mean = pc.mean(values).as_py()
            m2 = pc.variance(values, ddof=0).as_py() * present
            total = moments.count + present
            delta = mean - moments.mean
            moments.mean += delta * present / total
            moments.m2 += m2 + delta * delta * moments.count * present / total
            moments.count = total

    def result(self, path: Path) -> list[dict[str, Any]]:
        """The summary, reading the written file's statistics (and, where a row group has none,
        that column chunk)."""
        parquet = pq.ParquetFile(path)
        metadata = parquet.metadata
        out = []
        for position, (column, moments) in enumerate(zip(self.columns, self.moments, strict=True)):
            nulls, low, high = 0, None, None
            for group in range(metadata.num_row_groups):
                chunk = metadata.row_group(group).column(position)
                stats = chunk.statistics
                if (
                    stats is not None
                    and stats.has_null_count
                    and (stats.has_min_max or stats.null_count == chunk.num_values)
                ):
                    nulls += stats.null_count
                    group_low, group_high = (stats.min, stats.max) if stats.has_min_max else (None, None)
                else:  # no statistics: read this column chunk
                    values = _combined(parquet.read_row_group(group, columns=[column["name"]]).column(0))
                    nulls += values.null_count
                    group_low, group_high = (v.as_py() for v in pc.min_max(values).values())
                if group_low is not None:
                    low = group_low if low is None else min(low, group_low)
                    high = group_high if high is None else max(high, group_high)
            count = metadata.num_rows - nulls
            entry: dict[str, Any] = {
                "name": column["name"],
                "dtype": column["dtype"],
                "count": count,
                "null_count": nulls,
                "min": None,
                "max": None,
                "mean": None,
                "std": None,
            }
            if count:
                if column["dtype"] == "string":
                    entry["min"], entry["max"] = _text(low), _text(high)
                else:
                    entry["min"], entry["max"] = float(low), float(high)  # type: ignore[arg-type]
                    entry["mean"] = moments.mean
                    if count > 1:
                        entry["std"] = math.sqrt(moments.m2 / (count - 1))
            out.append(entry)
        return out


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def summarise_parquet(path: Path, columns: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The summary of a stored dataset, reading one row group of its numeric columns at a time."""
    builder = SummaryBuilder(columns)
    parquet = pq.ParquetFile(path)
    numeric = [column["name"] for column in columns if column["dtype"] != "string"]
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group, columns=numeric)
        builder.add([table.column(c["name"]) if c["dtype"] != "string" else pa.array([], pa.string()) for c in columns])
    return builder.result(path)


def _combined(array: pa.ChunkedArray) -> pa.Array:
    return array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)


# --- writing -----------------------------------------------------------------------------------


def parquet_schema(plans: Sequence[ColumnPlan]) -> pa.Schema:
    """The schema pandas would have written for these columns (its metadata included)."""
    return pandas_schema([{"name": plan.name, "dtype": plan.kind.dtype} for plan in plans])


class RowGroupWriter:
    """Parquet output in row groups of exactly ``rows`` rows (the last one shorter), written on a
    background thread so parsing the next piece overlaps writing this one."""

    def __init__(
        self,
        path: Path,
        schema: pa.Schema,
        rows: int,
        summary: SummaryBuilder | None = None,
        unique: str | None = None,
    ) -> None:
        """``unique`` names a text column whose values are all different (the key): it gets no
        dictionary, which could never pay off and costs a hash of every value."""
        text = [f.name for f in schema if pa.types.is_large_string(f.type) or pa.types.is_string(f.type)]
        numeric = {f.name: "none" for f in schema if f.name not in text}  # random floats do not compress
        self._writer = pq.ParquetWriter(
            path,
            schema,
            compression={**{name: "snappy" for name in text}, **numeric},
            use_dictionary=[name for name in text if name != unique],
            data_page_size=8 << 20,
        )
        self._path = path
        self._unsynced = 0
        self.schema = schema
        self.rows = rows
        self.summary = summary
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="parquet-writer")
        self._futures: list[Future[None]] = []
        self.written = 0

    def add(self, arrays: Sequence[pa.Array]) -> None:
        columns = [
            array.cast(f.type) if array.type != f.type else array for array, f in zip(arrays, self.schema, strict=True)
        ]
        batch = pa.RecordBatch.from_arrays(columns, schema=self.schema)
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows >= self.rows:
            table = pa.Table.from_batches(self._pending, schema=self.schema)
            full = (self._pending_rows // self.rows) * self.rows
            rest = table.slice(full)
            self._submit(table.slice(0, full))
            self._pending = rest.to_batches()
            self._pending_rows = rest.num_rows

    def _submit(self, table: pa.Table) -> None:
        while len(self._futures) >= WRITES_IN_FLIGHT:
            self._futures.pop(0).result()
        self._futures.append(self._executor.submit(self._write, table))
        self.written += table.num_rows

    def _write(self, table: pa.Table) -> None:
        if self.summary is not None:
            self.summary.add(table.columns)
        self._writer.write_table(table, self.rows)
        self._unsynced += table.nbytes
        if self._unsynced >= SYNC_BYTES:  # flush to disk as the file grows, off the parsing thread,
            self._unsynced = 0  # so the fsync before publication has little left to do
            descriptor = os.open(self._path, os.O_RDONLY)
            try:
                os.fdatasync(descriptor)
            finally:
                os.close(descriptor)

    def close(self) -> None:
        try:
            if self._pending_rows:
                self._submit(pa.Table.from_batches(self._pending, schema=self.schema))
                self._pending, self._pending_rows = [], 0
            for future in self._futures:
                future.result()
        finally:
            self._executor.shutdown(wait=True)
            self._writer.close()

    def abort(self) -> None:
        try:
            for future in self._futures:
                future.exception()
        finally:
            self._executor.shutdown(wait=True)
            self._writer.close()


# --- reading -----------------------------------------------------------------------------------


def _ends_inside_quotes(tail: bytes, at_file_start: bool, delimiter: str, last_row: Sequence[object]) -> bool:
    """Whether text ending with ``tail`` (whole lines) might end inside a quoted field, where
    pyarrow closes the field silently (pandas refuses a file ending so: "EOF inside string", and a
    cut there would split a field). It might if the quote opened on the last line, which then does
    not parse on its own, or on an earlier one: then ``last_row``, the last row pyarrow read, holds
    a line break. A last row with a line break inside quotes, legitimately, answers True too."""
    if any(isinstance(cell, str) and ("\n" in cell or "\r" in cell) for cell in last_row):
        return True
    body = tail[:-1] if tail.endswith((b"\n", b"\r")) else tail
    body = body[:-1] if tail.endswith(b"\r\n") else body
    start = max(body.rfind(b"\n"), body.rfind(b"\r")) + 1
    if start == 0 and not at_file_start:
        return True  # a last line longer than the tail: do not guess
    try:
        list(csv.reader([body[start:].decode("utf-8", errors="replace")], delimiter=delimiter, strict=True))
    except csv.Error:
        return True
    return False


def _last_row(columns: Sequence[pa.Array | pa.ChunkedArray]) -> list[object]:
    return [column[len(column) - 1].as_py() for column in columns if len(column)]


class _RowTooLong(Exception):
    """A row straddled two blocks: read again with bigger blocks."""


class _CutInsideQuotes(Exception):
    """A piece may end inside a quoted field: read the file with the streaming reader instead."""


def _arrow_options(
    header: list[str],
    delimiter: str,
    plans: Sequence[ColumnPlan],
    block_bytes: int,
    skip_header: bool,
    threads: bool = True,
) -> tuple[pcsv.ReadOptions, pcsv.ParseOptions, pcsv.ConvertOptions]:
    read = pcsv.ReadOptions(
        column_names=header, skip_rows=1 if skip_header else 0, block_size=block_bytes, use_threads=threads
    )
    parse = pcsv.ParseOptions(delimiter=delimiter, quote_char='"', double_quote=True, newlines_in_values=True)
    convert = pcsv.ConvertOptions(
        column_types={plan.name: pa.float64() if plan.read_double else pa.string() for plan in plans}
        or {name: pa.string() for name in header},
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
        check_utf8=False,  # checked while spooling
    )
    return read, parse, convert


def _arrow_errors(exc: pa.ArrowInvalid) -> Exception:
    """What a pyarrow refusal means for the pass: a conversion to restart, bigger blocks, or the
    exact tokenizer."""
    message = str(exc)
    conversion = re.search(r"In CSV column #(\d+): CSV conversion error", message)
    if conversion is not None:
        return _Restart(int(conversion.group(1)), read_double=False)
    if "straddles two block boundaries" in message:
        return _RowTooLong(message)
    return _NeedExactTokenizer(message)


def _pieces(path: Path, piece_bytes: int) -> Iterator[tuple[memoryview, bool, bool]]:
    """The file cut after line ends (``\\n`` or ``\\r``) into pieces of about ``piece_bytes``, each one
    fresh buffer read straight from the file; with each, whether it ends the file and whether it
    holds a quote."""
    with open(path, "rb") as raw:
        carry = b""
        while True:
            buffer = bytearray(len(carry) + piece_bytes)
            buffer[: len(carry)] = carry
            view = memoryview(buffer)
            filled = len(carry) + raw.readinto(view[len(carry) :])
            if filled < len(buffer):  # the end of the file
                if filled:
                    yield view[:filled], True, buffer.find(b'"', 0, filled) >= 0
                return
            cut = max(buffer.rfind(b"\n"), buffer.rfind(b"\r"))
            if cut < 0:  # a line longer than the piece: read on
                carry = bytes(view)
                continue
            carry = bytes(view[cut + 1 :])
            yield view[: cut + 1], False, buffer.find(b'"', 0, cut + 1) >= 0


def arrow_pieces(
    path: Path,
    header: list[str],
    delimiter: str,
    plans: Sequence[ColumnPlan],
    block_bytes: int = 0,
    quoted: bool = True,
    streaming: bool = False,
    progress: Progress | None = None,
) -> Generator[list[pa.Array], None, None]:
    """The file parsed by pyarrow. Without ``plans`` every column is read as text; with them, the
    columns they say are converted to ``float64`` by the reader itself.

    By default the file is cut at line ends into pieces, each parsed by ``read_csv`` on both cores.
    A cut inside a quoted field (possible only in a ``quoted`` file) is caught at the piece's end
    (:func:`_ends_inside_quotes`): the pass is then run with ``streaming``, pyarrow's streaming
    reader, which follows quotes across blocks itself (on one core)."""
    block_bytes = block_bytes or BLOCK_BYTES
    try:
        if streaming:
            read, parse, convert = _arrow_options(header, delimiter, plans, block_bytes, skip_header=True)
            reader = pcsv.open_csv(path, read, parse, convert)
            last: list[pa.Array] = []
            with reader:
                for batch in reader:
                    if batch.num_rows:
                        last = list(batch.columns)
                        yield last
            if quoted and last and _ends_inside_quotes(_tail(path), False, delimiter, _last_row(last)):
                raise _NeedExactTokenizer("the file may end inside a quoted field")
            return
        # Pieces are parsed on PARSERS threads, each piece in one block on one thread (pyarrow's
        # own split of a piece into blocks costs a quarter of the parse), PARSERS pieces ahead.
        parsers = ThreadPoolExecutor(PARSERS, thread_name_prefix="csv-parse")
        try:
            source = _pieces(path, max(PIECE_BYTES, block_bytes))
            ahead: deque[tuple[Future[pa.Table], memoryview, bool, bool, bool]] = deque()
            consumed = 0
            while True:
                while len(ahead) < PARSERS:
                    item = next(source, None)
                    if item is None:
                        break
                    piece, final, has_quote = item
                    first = consumed == 0 and not ahead
                    read, parse, convert = _arrow_options(
                        header, delimiter, plans, max(block_bytes, len(piece) + 1), skip_header=first, threads=False
                    )
                    parsed = parsers.submit(_read_piece, piece, has_quote, read, parse, convert)
                    ahead.append((parsed, piece, final, has_quote, first))
                    consumed += len(piece)
                if not ahead:
                    break
                parsed, piece, final, has_quote, first = ahead.popleft()
                table = parsed.result()
                if progress is not None:
                    progress.advance(consumed - sum(len(later[1]) for later in ahead))
                if quoted and has_quote and table.num_rows:  # a piece with no quote cannot end inside one
                    tail = bytes(piece[-TAIL_BYTES:])
                    if _ends_inside_quotes(
                        tail, first and len(piece) <= TAIL_BYTES, delimiter, _last_row(table.columns)
                    ):
                        if final:
                            raise _NeedExactTokenizer("the file may end inside a quoted field")
                        raise _CutInsideQuotes()
                # block by block (one record batch per block): no copy to make each column one chunk
                for batch in table.to_batches():
                    if batch.num_rows:
                        yield list(batch.columns)
        finally:
            parsers.shutdown(wait=True, cancel_futures=True)
    except pa.ArrowInvalid as exc:
        raise _arrow_errors(exc) from exc


def _read_piece(
    piece: memoryview,
    has_quote: bool,
    read: pcsv.ReadOptions,
    parse: pcsv.ParseOptions,
    convert: pcsv.ConvertOptions,
) -> pa.Table:
    """``read_csv`` of one piece. pyarrow splits a piece into blocks for its threads; when the piece
    holds no quote at all, no value can hold a line break, and pyarrow is told so
    (``newlines_in_values=False``): it then finds block ends a third faster. (With quotes, a block
    end could fall inside a quoted value, and nothing cheap tells the result is wrong: measured.)"""
    if parse.newlines_in_values and not has_quote:
        parse = pcsv.ParseOptions(
            delimiter=parse.delimiter,
            quote_char=parse.quote_char,
            double_quote=parse.double_quote,
            newlines_in_values=False,
        )
    return pcsv.read_csv(pa.BufferReader(pa.py_buffer(piece)), read, parse, convert)


def _probe(path: Path, header: list[str], delimiter: str, block_bytes: int) -> list[pa.Array] | None:
    """The first rows (at least :data:`PROBE_ROWS` when the file has them), every column as text.

    The file's first :data:`PROBE_BYTES`, cut after a line end, parsed at once; when that text
    might end inside a quoted field (or does not parse), the first block of pyarrow's streaming
    reader instead, which follows quotes across blocks (slower: it reads ahead)."""
    with open(path, "rb") as raw:
        head = raw.read(PROBE_BYTES)
        whole = len(head) < PROBE_BYTES or not raw.read(1)
    cut = len(head) if whole else max(head.rfind(b"\n"), head.rfind(b"\r")) + 1
    if cut > 0:
        read, parse, convert = _arrow_options(header, delimiter, [], block_bytes, skip_header=True)
        try:
            table = pcsv.read_csv(pa.BufferReader(head[:cut]), read, parse, convert)
        except pa.ArrowInvalid:
            table = None
        if table is not None and table.num_rows and (whole or table.num_rows >= PROBE_ROWS):
            tail = head[max(0, cut - TAIL_BYTES) : cut]
            if not _ends_inside_quotes(tail, cut <= TAIL_BYTES, delimiter, _last_row(table.columns)):
                return [_combined(column) for column in table.columns]
    probe = arrow_pieces(path, header, delimiter, [], block_bytes, quoted=False, streaming=True)
    try:
        return next(probe, None)
    finally:
        probe.close()


def _tail(path: Path) -> bytes:
    with open(path, "rb") as raw:
        size = raw.seek(0, os.SEEK_END)
        raw.seek(max(0, size - TAIL_BYTES))
        return raw.read()


def pandas_pieces(path: Path, header: list[str], delimiter: str) -> Iterator[list[pa.Array]]:
    """Pieces tokenized by pandas' C parser with the original parser's options (quotes, ragged rows)."""
    with open(path, "rb") as raw:
        sample = raw.read(1 << 20)
    lines = max(sample.count(b"\n"), 1)
    rows = max(1000, int(PANDAS_CHUNK_BYTES / max(len(sample) / lines, 1)))
    try:
        reader = pd.read_csv(
            path,
            sep=delimiter,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            header=0,
            engine="c",
            encoding="utf-8-sig",
            chunksize=rows,
        )
        with reader:
            for frame in reader:
                if frame.shape[1] != len(header) or not isinstance(frame.index, pd.RangeIndex):
                    # pandas takes a first row with one field too many as a sign that the first
                    # column is an index, and shifts every column by one: refused, never shifted
                    raise InvalidInput(
                        f"the file is not valid CSV: a row has more fields than the {len(header)} columns "
                        "the header names"
                    )
                if frame.shape[1] != len(header):
                    raise InvalidInput(
                        f"the file is not valid CSV: rows have {frame.shape[1]} fields but the header names "
                        f"{len(header)} columns"
                    )
                yield [
                    pa.array(frame.iloc[:, i].to_numpy(object), type=pa.string(), from_pandas=True)
                    for i in range(len(header))
                ]
    except pd.errors.EmptyDataError as exc:
        raise InvalidInput("the file is empty") from exc
    except (pd.errors.ParserError, ValueError) as exc:
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput(f"the file is not valid CSV: {str(exc).strip()}") from exc


def _text_array(cells: pd.Series) -> pa.Array:
    return pa.array(cells.to_numpy(object), type=pa.string(), from_pandas=True)


# --- the whole ingest --------------------------------------------------------------------------


def ingest_csv(
    path: Path,
    facts: SpoolFacts,
    out_path: Path,
    *,
    delimiter: str,
    key_column: str | None,
    max_columns: int,
    row_group_rows: int,
    progress: Progress | None = None,
) -> IngestResult:
    """Type the spooled CSV at ``path`` and write it to ``out_path`` as Parquet (see module docs).

    ``progress``, when given, follows the bytes parsed (the fast reader's pieces) and rows written.

    Raises :class:`InvalidInput` with the original parser's messages; ``out_path`` may be left
    half-written on error (the caller's staged file discards it).
    """
    check_spool(facts)
    progress = progress or Progress()
    progress.stage("parsing", total=facts.size, unit="bytes")
    header = read_header(path, delimiter, max_columns)
    check_key_column(header, key_column)
    # pandas skips a line of blanks, which in a one-column file the fast reader would take for a row
    exact_tokenizer = len(header) == 1
    plans: list[ColumnPlan] = []
    restarts = [0] * len(header)
    block_bytes = BLOCK_BYTES
    streaming = False
    while True:
        try:
            if exact_tokenizer:
                pieces = pandas_pieces(path, header, delimiter)
            else:
                if not plans:  # column types assumed from the first rows, read as text
                    first = _probe(path, header, delimiter, block_bytes)
                    if first is None:
                        raise InvalidInput("the file has a header but no data rows")
                    plans = assume_plans(header, key_column, first)
                pieces = arrow_pieces(path, header, delimiter, plans, block_bytes, facts.has_quote, streaming, progress)
            return _one_pass(pieces, header, key_column, plans, out_path, row_group_rows, progress)
        except _PassRestart as again:
            plans = again.plans
            restarts[again.position] += 1
            if restarts[again.position] > _RESTARTS_PER_COLUMN:  # cannot happen: types only weaken
                raise AssertionError(f"column {header[again.position]!r} was re-typed too often") from again
        except _CutInsideQuotes:
            streaming = True
        except _RowTooLong:
            if block_bytes >= MAX_BLOCK_BYTES:
                exact_tokenizer = True
            block_bytes *= 4
        except _NeedExactTokenizer:
            exact_tokenizer, plans = True, []


class _PassRestart(Exception):
    def __init__(self, plans: list[ColumnPlan], position: int) -> None:
        super().__init__(position)
        self.plans, self.position = plans, position


def _one_pass(
    pieces: Iterator[list[pa.Array]],
    header: list[str],
    key_column: str | None,
    plans: list[ColumnPlan],
    out_path: Path,
    row_group_rows: int,
    progress: Progress,
) -> IngestResult:
    writer: RowGroupWriter | None = None
    typer: ChunkTyper | None = None
    summary: SummaryBuilder | None = None
    offset = 0
    try:
        for arrays in pieces:
            if not plans:
                plans.extend(assume_plans(header, key_column, arrays))
            if typer is None:
                typer = ChunkTyper(plans)
                columns = [{"name": plan.name, "dtype": plan.kind.dtype} for plan in plans]
                summary = SummaryBuilder(columns)
                writer = RowGroupWriter(out_path, parquet_schema(plans), row_group_rows, summary, key_column)
            try:
                typed = typer.type_piece(arrays, offset)
            except _Restart as restart:
                weakened = [ColumnPlan(p.name, p.kind, p.read_double) for p in plans]
                target = weakened[restart.position]
                if restart.kind is not None:
                    target.kind, target.read_double = restart.kind, restart.kind is Kind.FLOAT and target.read_double
                if restart.read_double is not None:
                    target.read_double = restart.read_double
                raise _PassRestart(weakened, restart.position) from None
            assert writer is not None
            writer.add(typed)
            offset += len(arrays[0]) if arrays else 0
            progress.rows_written(offset)
    except _Restart as restart:  # raised by the reader (a conversion the fast reader refused)
        weakened = [ColumnPlan(p.name, p.kind, p.read_double) for p in plans]
        weakened[restart.position].read_double = False
        if writer is not None:
            writer.abort()
        raise _PassRestart(weakened, restart.position) from None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None or typer is None or summary is None or offset == 0:
        if writer is not None:
            writer.abort()
        raise InvalidInput("the file has a header but no data rows")
    try:
        typer.raise_findings()
    except BaseException:
        writer.abort()
        raise
    writer.close()
    columns = [{"name": plan.name, "dtype": plan.kind.dtype} for plan in typer.plans]
    key_ascending = key_column is not None and typer.key_ascending
    return IngestResult(header, columns, offset, summary.result(out_path), key_ascending)
