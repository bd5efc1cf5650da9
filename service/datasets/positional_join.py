"""A 1:1 join by row positions: match keys through sorted 64-bit hashes, then gather the other side.

The columnar derive (:mod:`service.datasets.columnar`) joins two tables whose join values are
unique on both sides (duplicates are refused before), keeping this side's row order. DuckDB's hash
join does that, but under a small memory limit it spills its hash table and the sort that restores
the order: at 10 million rows a join took 3 to 4 times as long as the same join given all the
memory it wants. This module does the same join in a few streamed passes and bounded numpy arrays:

1. **Match.** The other side's join values are hashed (DuckDB's ``hash`` of their text) into one
   ``uint64`` array, argsorted; this side's hashes are streamed in row order and looked up with
   ``searchsorted``. The result is ``positions``: for each row of this side, the row of the other
   side with the same hash, or -1. Two different values of the other side with one hash (about one
   chance in 10^7 at 10^6 rows) make :func:`match_positions` give up (the caller then uses DuckDB).
2. **Verify.** A hash match is a candidate only: the other side's join values (as text) are
   loaded, gathered at ``positions`` and compared with this side's, streamed; a row whose values
   differ is unmatched. So the result is exact (a missing value matches a missing one, as pandas
   does), whatever the hash.
3. **Gather.** Each column of the other side that is kept is loaded on its own, gathered at
   ``positions`` and written in this side's row order to an Arrow IPC file in chunks.
4. **Write.** This side's columns are streamed in row order next to the gathered chunks (read one
   at a time from the IPC files) into one Parquet file, in this side's order, unmatched rows
   dropped for an inner join.

Memory held in Python: 4 bytes per row of this side (``positions``; 8 beyond 2^31 rows), 12 bytes
per row of the other side while matching, then one column of the other side at a time (its
in-memory size: 8 bytes a row for numbers, offsets + characters for text), plus a chunk of each.
:func:`join_memory` estimates the peak; the caller compares it with its budget first.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CHUNK_ROWS = 1 << 17
FETCH_ROWS = 1 << 18  # rows asked of DuckDB at a time: it fills large batches on both cores
# A function giving a SQL query's result as Arrow batches of about ``rows`` rows, in order.
Batches = Callable[[str, int], Iterator[pa.RecordBatch]]


@dataclass(frozen=True)
class GatheredColumn:
    """A column of the other side: its name in the output, the query giving it in row order (one
    column), its rows, its total size in bytes when it is text, and whether to widen integers to
    float64 (pandas does when some row found no match)."""

    ref: str
    sql: str
    rows: int
    text_bytes: int | None = None
    to_float: bool = False


def join_memory(left_rows: int, right_rows: int, largest_right_column_bytes: int, row_limit: int = 0) -> int:
    """The most bytes :func:`match_positions` and :func:`write_joined` hold at once (estimate):
    ``row_limit`` is one more than the left side's largest row number (its rows, unfiltered)."""
    index_bytes = 4 if max(left_rows, right_rows, row_limit) < 2**31 else 8
    matching = (8 + index_bytes) * right_rows + index_bytes * max(row_limit, left_rows) + 16 * FETCH_ROWS
    gathering = largest_right_column_bytes + 2 * CHUNK_ROWS * 64
    return left_rows * index_bytes + max(matching, gathering)


def _column(batches: Batches, sql: str, rows: int, text_bytes: int | None = None) -> pa.Array:
    """A one-column query's ``rows`` values as one contiguous array, filled in place chunk by chunk
    (never the chunks and their concatenation at once). Text needs ``text_bytes``, its total size
    in bytes (else the chunks are concatenated)."""
    stream = batches(sql, FETCH_ROWS)
    first = next(stream, None)
    if first is None:
        return pa.array([])
    kind = first.schema.field(0).type
    valid = np.empty(rows, np.bool_)
    start = 0
    if pa.types.is_large_string(kind) and text_bytes is not None:
        offsets = np.empty(rows + 1, np.int64)
        data = np.empty(text_bytes, np.uint8)
        offsets[0] = 0
        for batch in _chain(first, stream):
            chunk = batch.column(0)
            stop = start + len(chunk)
            valid[start:stop] = chunk.is_valid().to_numpy(zero_copy_only=False)
            _, chunk_offsets, chunk_data = chunk.buffers()
            begins = np.frombuffer(chunk_offsets, np.int64, len(chunk) + 1, chunk.offset * 8)
            base = int(offsets[start])
            offsets[start + 1 : stop + 1] = begins[1:] - begins[0] + base
            size = int(begins[-1] - begins[0])
            if size:
                data[base : base + size] = np.frombuffer(chunk_data, np.uint8, size, int(begins[0]))
            start = stop
        assert start == rows and int(offsets[-1]) <= text_bytes, "the column is not the size announced"
        mask = pa.py_buffer(np.packbits(valid, bitorder="little"))
        return pa.LargeStringArray.from_buffers(
            rows,
            pa.py_buffer(offsets),
            pa.py_buffer(data[: int(offsets[-1])]),
            mask,
            null_count=int(rows - valid.sum()),
        )
    if pa.types.is_large_string(kind) or pa.types.is_string(kind):
        chunks = [batch.column(0) for batch in _chain(first, stream)]
        return pa.concat_arrays(chunks) if len(chunks) > 1 else chunks[0]
    values = np.empty(rows, kind.to_pandas_dtype())
    for batch in _chain(first, stream):
        chunk = batch.column(0)
        stop = start + len(chunk)
        valid[start:stop] = chunk.is_valid().to_numpy(zero_copy_only=False)
        values[start:stop] = chunk.fill_null(0).to_numpy(zero_copy_only=False)
        start = stop
    assert start == rows, f"{start} values, expected {rows}"
    return pa.array(values, type=kind, mask=~valid)


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest


def match_positions(
    batches: Batches,
    *,
    right_sorted: str,
    left_sorted: str,
    left_order: str,
    left_values: str,
    right_values: str,
    left_rows: int,
    right_rows: int,
    row_limit: int,
    budget: int,
) -> np.ndarray | None:
    """For each left row (in order), the matching right row, or -1; None when two right values share
    a hash or the join would hold more than ``budget`` bytes (see :func:`join_memory`).

    The queries: ``right_sorted`` gives the right side's ``hash`` (UBIGINT) of each value, the
    value's byte length and the row's position, ordered by hash; ``left_sorted`` the left side's
    hash and row number (below ``row_limit``), ordered by hash; ``left_order`` the left row numbers
    in row order; ``left_values`` and ``right_values`` each side's text value in row order. DuckDB
    sorts (on both cores, spilling beyond its limit); numpy only merges two sorted streams.
    """
    index_type = np.int32 if max(row_limit, right_rows) < 2**31 else np.int64
    right = np.empty(right_rows, np.uint64)
    order = np.empty(right_rows, index_type)
    filled = text_bytes = 0
    for batch in batches(right_sorted, FETCH_ROWS):
        stop = filled + batch.num_rows
        right[filled:stop] = batch.column(0).to_numpy(zero_copy_only=False)
        text_bytes += int(pc.sum(batch.column(1)).as_py() or 0)
        order[filled:stop] = batch.column(2).to_numpy(zero_copy_only=False)
        filled = stop
    assert filled == right_rows, f"{filled} right hashes, expected {right_rows}"
    if join_memory(left_rows, right_rows, text_bytes + 9 * right_rows, row_limit) > budget:
        return None
    if right_rows > 1 and bool(np.any(right[1:] == right[:-1])):
        return None
    by_row = np.full(row_limit, -1, index_type)
    low = 0  # the left hashes come sorted: each batch is looked up in what follows the previous one
    for batch in batches(left_sorted, FETCH_ROWS):
        if right_rows == 0 or low >= right_rows:
            break
        hashes = batch.column(0).to_numpy(zero_copy_only=False)
        at = np.searchsorted(right[low:], hashes) + low
        np.minimum(at, right_rows - 1, out=at)
        hit = right[at] == hashes
        rows = batch.column(1).to_numpy(zero_copy_only=False)
        by_row[rows[hit]] = order[at[hit]]
        low = int(at[-1])
    del right, order
    positions = np.empty(left_rows, index_type)
    filled = 0
    for batch in batches(left_order, FETCH_ROWS):
        stop = filled + batch.num_rows
        positions[filled:stop] = by_row[batch.column(0).to_numpy(zero_copy_only=False)]
        filled = stop
    assert filled == left_rows, f"{filled} left rows, expected {left_rows}"
    del by_row
    _verify(batches, positions, left_values, _column(batches, right_values, right_rows, text_bytes))
    return positions


def _verify(batches: Batches, positions: np.ndarray, left_values: str, values: pa.Array) -> None:
    """Unmatch (-1) every candidate whose values differ: the hash only proposed it."""
    start = 0
    for batch in batches(left_values, FETCH_ROWS):
        left = batch.column(0)
        stop = start + len(left)
        candidates = positions[start:stop]
        found = candidates >= 0
        if found.any():
            indices = pa.array(candidates, mask=~found)
            right = pc.take(values, indices)
            same = pc.fill_null(pc.equal(left, right), False)
            both_missing = pc.and_(pc.is_null(left), pc.is_null(right))
            matched = pc.or_(same, both_missing).to_numpy(zero_copy_only=False) & found
            candidates[found & ~matched] = -1
        start = stop


def write_joined(
    batches: Batches,
    positions: np.ndarray,
    *,
    left_sql: str,
    gathered: Sequence[GatheredColumn],
    inner: bool,
    out_path: Path,
    work_directory: Path,
) -> None:
    """Write ``left_sql``'s columns (in row order) and the ``gathered`` right columns side by side to
    ``out_path``; for an inner join only the rows that found a match."""
    scratch = Path(tempfile.mkdtemp(prefix="gather-", dir=work_directory))
    try:
        files = [_gather(batches, positions, column, scratch) for column in gathered]
        _zip(batches, positions, left_sql, gathered, files, inner, out_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _gather(batches: Batches, positions: np.ndarray, column: GatheredColumn, scratch: Path) -> Path:
    values = _column(batches, column.sql, column.rows, column.text_bytes)
    if column.to_float:
        values = values.cast(pa.float64())
    path = scratch / f"{column.ref}.arrow"
    schema = pa.schema([(column.ref, values.type)])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(positions), CHUNK_ROWS):
            chunk = positions[start : start + CHUNK_ROWS]
            taken = pc.take(values, pa.array(chunk, mask=chunk < 0))
            writer.write_batch(pa.record_batch([taken], schema=schema))
    return path


def _rechunked(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Batches regrouped into tables of exactly ``rows`` rows (the last one shorter)."""
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for batch in batches:
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, pending_rows = rest.to_batches(), rest.num_rows
    if pending_rows:
        yield pa.Table.from_batches(pending)


def _zip(
    batches: Batches,
    positions: np.ndarray,
    left_sql: str,
    gathered: Sequence[GatheredColumn],
    files: Sequence[Path],
    inner: bool,
    out_path: Path,
) -> None:
    sources = [pa.OSFile(str(path)) for path in files]
    readers = [pa.ipc.open_file(source) for source in sources]
    writer: pq.ParquetWriter | None = None
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="join-writer") as background:
            writing: Future[None] | None = None
            start = 0
            for index, left in enumerate(_rechunked(batches(left_sql, FETCH_ROWS), CHUNK_ROWS)):
                stop = start + left.num_rows
                arrays = [left.column(i).combine_chunks() for i in range(left.num_columns)]
                names = list(left.column_names)
                for column, reader in zip(gathered, readers, strict=True):
                    arrays.append(reader.get_batch(index).column(0))
                    names.append(column.ref)
                table = pa.Table.from_arrays(arrays, names=names)
                if inner:
                    table = table.filter(pa.array(positions[start:stop] >= 0))
                if writer is None:  # a scratch file read once or twice: written as fast as it can be
                    text = [f.name for f in table.schema if pa.types.is_large_string(f.type)]
                    writer = pq.ParquetWriter(
                        out_path,
                        table.schema,
                        compression={f.name: ("lz4" if f.name in text else "none") for f in table.schema},
                        use_dictionary=False,
                        write_statistics=False,
                    )
                if writing is not None:
                    writing.result()
                writing = background.submit(writer.write_table, table)
                start = stop
            if writing is not None:
                writing.result()
    finally:
        if writer is not None:
            writer.close()
        for source in sources:
            source.close()
    if writer is None:
        raise ValueError("the left side has no rows")  # callers join non-empty tables only
