"""Derive steps over Parquet files with DuckDB: the out-of-core twin of :func:`transforms.apply_steps`.

:func:`derive_parquet` runs the same steps as ``apply_steps`` (followed by ``ensure_unique_key``, as
``DatasetService.derive`` does) on the datasets' Parquet files and writes the result as a Parquet
file, without loading any dataset into memory. The result is the one the pandas path gives: the
same rows in the same order, the same columns, dtypes and values (float results bit for bit), the
same fitted steps, and the same :class:`~service.errors.InvalidInput` (message and details) for
every refusal. The file reads back with ``pd.read_parquet`` exactly like one written by
``DataFrame.to_parquet(index=False, row_group_size=row_group_rows)``: same Arrow schema (pandas
metadata included), row groups of ``row_group_rows`` rows. :func:`check_key_parquet` is
``parsing.check_key`` over a Parquet file of any size.

How it runs. The table between steps is a DuckDB query, not data: ``select``, ``drop`` and
``rename`` only change which columns it names; ``dropna``, ``scale`` and ``fillna`` wrap it in one
more ``SELECT``. DuckDB streams every query, with ``memory_limit`` as its ceiling and
``temp_directory`` for what it spills (a join's hash table, the sort that restores row order).
The one thing written to disk between steps is a join's result (unsorted, only the columns later
steps read or keep, as Parquet in a work directory under ``temp_directory``, removed at the end):
a join below a sort can exhaust ``memory_limit``, and every later pass would run the join again.
The result is streamed from DuckDB as Arrow batches into a ``pyarrow`` Parquet writer (one row
group encoded on a background thread while DuckDB produces the next). Steps that must look at the
data first make extra passes over the query:

* ``join``: an aggregation per side refuses duplicate join values, unless the join column is that
  side's key and known unique (a stored dataset's key always is: ``ParquetInput.key_unique``); a
  ``left`` join whose other side has ``int64`` columns also asks whether any row is unmatched
  (pandas then makes those columns ``float64``); then the join is written out (above). Values are
  compared as text, like pandas' ``astype("string")`` (DuckDB writes a DOUBLE as Python's shortest
  repr does: ``1.0``, ``1e+16``), a missing value matching a missing one.
* ``scale``: one aggregation (count, min, max); ``standard`` then streams the columns twice, for
  the sum and for the squared deviations, summed by :class:`PairwiseSum` exactly as numpy sums
  (pairwise), so mean and std are numpy's to the last bit. DuckDB's ``avg``/``stddev_pop`` are not.
* ``fillna``: an aggregation finds the columns with nulls (when none are named) and counts values;
  ``mean`` then streams the columns once for their sums (pandas' ``Series.mean``, bit for bit).
* ``dropna``, ``select``, ``drop``, ``rename``: no pass over the data.
* at the end, the key check of ``ensure_unique_key`` reads the written file's key column, unless
  the steps kept a key known to be unique (a stored key through filters, renames and joins).

The transformations are SQL expressions with the float operations in pandas' order, constants
written exactly (``CAST('<repr>' AS DOUBLE)``), and a NaN result turned into a null (pandas treats
NaN as missing and writes it as null). The rows keep their order through ``__row`` (the file's row
number): scans, filters and projections keep DuckDB's insertion order (documented guarantee);
a join does not, so after one every ordered read (the result, the streamed sums) sorts the
written-out join by ``__row``.

Memory held in Python: one Arrow batch of a stream and about two row groups of the output at a
time, and O(rows / 64) partial sums per streamed column. Each column is addressed in SQL by an
internal name (``c0``, ``c1``, ...) because DuckDB resolves names case-insensitively (``a`` and
``A`` are one name to it); the user's names exist only in the output file's schema. Error paths
may read more: the cells named in a "not numeric" refusal and the duplicates named in a join or
key refusal come from further queries (bounded results, never whole columns).
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import count
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.datasets import DeriveStep, DropNaStep, DropStep, FillNaStep, JoinStep, RenameStep, ScaleStep, SelectStep
from service.datasets.parsing import NUMBER_PATTERN, check_column_names, parse_number
from service.datasets.positional_join import GatheredColumn, join_memory, match_positions, write_joined
from service.datasets.progress import Progress, duckdb_fraction
from service.datasets.steps import (
    ColumnScale,
    FillValue,
    FittedDrop,
    FittedDropNa,
    FittedFillNa,
    FittedJoin,
    FittedRename,
    FittedScale,
    FittedSelect,
    FittedStep,
    MinMaxParams,
    _describe_integer,
    _fits_a_float,
    minmax_params,
    standard_params,
)
from service.errors import InvalidInput

NO_ROWS_OR_COLUMNS = "the steps leave no rows or no columns"
STREAM_BATCH_ROWS = 1 << 18  # rows per Arrow batch of a streamed pass (a few MB per column)
_PAGE_ROWS = 1_000  # candidate cells looked at per query when naming non-numeric cells
# A cell fully matching this (ASCII digits, ASCII blanks around) is a number for parse_number too:
# every character allowed around it is one str.strip() removes, and RE2's \d is a subset of re's.
_SURELY_NUMBER_RE2 = rf"[\t\n\v\f\r\x1c-\x1f ]*(?:{NUMBER_PATTERN})[\t\n\v\f\r\x1c-\x1f ]*"
_NAN = "CAST('nan' AS DOUBLE)"


@dataclass(frozen=True)
class ParquetInput:
    """A stored dataset: its Parquet file, key column and columns as ``DatasetTable.columns`` lists
    them (``{"name", "dtype"}``, dtype ``int64``, ``float64`` or ``string``), in file order."""

    path: Path
    key_column: str | None
    columns: list[dict[str, str]]
    #: The key column labels every row exactly once. True of every stored dataset (checked when it
    #: was stored), which spares the duplicate checks a join on it and the final key check would
    #: make; pass False for a file whose key was never checked.
    key_unique: bool = True


@dataclass(frozen=True)
class DeriveResult:
    """What :func:`derive_parquet` made: the fitted steps (what ``apply_steps`` returns as its second
    value), and the written file's key column, columns (``{"name", "dtype"}``) and row count."""

    steps: list[FittedStep]
    key_column: str | None
    columns: list[dict[str, str]]
    row_count: int


def derive_parquet(
    parent: ParquetInput,
    steps: Sequence[DeriveStep],
    inputs: Mapping[str, ParquetInput],
    out_path: Path,
    *,
    row_group_rows: int,
    memory_limit: str = "256MB",
    temp_directory: Path,
    progress: Progress | None = None,
) -> DeriveResult:
    """Apply ``steps`` to ``parent`` and write the result to ``out_path`` (removed on failure).

    ``inputs`` maps dataset ids to their files for ``join`` steps. Raises exactly what
    ``apply_steps`` and then ``ensure_unique_key`` raise on the same tables. ``progress``, when
    given, is told each stage (one per step, then writing, then the key check) and, while a
    DuckDB statement runs, follows that statement's own progress.
    """
    progress = progress or Progress()
    progress.plan(len(steps) + 2)
    try:
        with _Engine(memory_limit, temp_directory) as engine:
            table = engine.scan(parent)
            fitted: list[FittedStep] = []
            for index, step in enumerate(steps):
                progress.stage(f"step {index + 1} of {len(steps)}: {step.op}")
                progress.live(duckdb_fraction(engine.connection))
                try:
                    table, record = _apply(engine, table, step, inputs)
                except InvalidInput as exc:
                    exc.message = f"step {index} ({step.op}): {exc.message}"
                    raise
                fitted.append(record)
                if table.joins:  # once, with what later steps read or keep
                    table = engine.materialise(table, keep=_live_refs(table, steps[index + 1 :], inputs))
            row_count = _write(engine, table, out_path, row_group_rows, progress)
            progress.stage("checking the result")
            if table.key_column is not None and not table.key_unique:
                progress.live(duckdb_fraction(engine.connection))
                _check_key(engine, engine.scan_file(out_path), table.key_column)
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    columns = [{"name": column.name, "dtype": column.dtype} for column in table.columns]
    return DeriveResult(fitted, table.key_column, columns, row_count)


def check_key_parquet(
    path: Path, key_column: str, *, memory_limit: str = "256MB", temp_directory: Path | None = None
) -> None:
    """:func:`parsing.check_key` on a Parquet file's column, in bounded memory: the first empty row,
    else the duplicated values in the order of their second occurrence."""
    with _Engine(memory_limit, temp_directory) as engine:
        _check_key(engine, engine.scan_file(path), key_column)


# --- the table between steps -------------------------------------------------------------------


@dataclass(frozen=True)
class _Column:
    name: str  # the user's name
    dtype: str  # int64 | float64 | string; int64 columns never hold nulls (as in pandas)
    ref: str  # its name in SQL
    stored: bool = True  # False: the table's query no longer carries it (no later step reads it)

    @property
    def numeric(self) -> bool:
        return self.dtype != "string"

    @property
    def as_double(self) -> str:
        return f"CAST({self.ref} AS DOUBLE)" if self.dtype == "int64" else self.ref

    @property
    def as_text(self) -> str:
        """The values as pandas' ``astype("string")`` writes them (DuckDB's DOUBLE to VARCHAR is
        Python's shortest repr: ``1.0``, ``1e+16``)."""
        return self.ref if self.dtype == "string" else f"CAST({self.ref} AS VARCHAR)"


@dataclass(frozen=True, eq=False)
class _PositionalJoin:
    """A join whose rows are matched (``positions``: the right row of each left row, or -1)."""

    left: _Table
    right: _Table
    on: str  # the left side's join column (the result's column ``key``)
    key: _Column
    extra: tuple[_Column, ...]
    inner: bool
    positions: np.ndarray
    right_rows: int


@dataclass(frozen=True)
class _Table:
    """A query whose rows are the table's (``__row`` orders them) and the columns it exposes."""

    sql: str  # SELECT __row, <column refs>, ... (it may carry columns no longer exposed)
    columns: tuple[_Column, ...]
    key_column: str | None
    ordered: bool  # DuckDB yields the rows in __row order without ORDER BY (no join upstream)
    key_unique: bool = False  # the key column is known to be unique and non-null
    joins: bool = False  # a join runs in the query (never sort it: Engine.materialise first)
    # A join matched by positions (positional_join), to be written out by Engine.materialise
    positional: _PositionalJoin | None = None

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    def column(self, name: str) -> _Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)  # as frame[name] would (callers check names first)

    def select(self, expressions: Sequence[str], *, ordered: bool) -> str:
        """``SELECT expressions FROM`` this table, in row order when ``ordered``."""
        assert not (ordered and self.joins), "a join below a sort: read Engine.materialise(table)"
        order = " ORDER BY __row" if ordered and not self.ordered else ""
        return f"SELECT {', '.join(expressions)} FROM ({self.sql}) AS t{order}"

    def with_columns(self, columns: Sequence[_Column], key_column: str | None) -> _Table:
        """The same rows, other columns (a select, drop or rename: a unique key stays unique)."""
        return replace(
            self, columns=tuple(columns), key_column=key_column, key_unique=self.key_unique and key_column is not None
        )

    def narrow(self, columns: Sequence[_Column]) -> _Table:
        """The same rows with only these columns (no key): what a streamed pass reads."""
        return replace(self, columns=tuple(columns), key_column=None, key_unique=False)

    def with_sql(self, sql: str, columns: Sequence[_Column]) -> _Table:
        """Other columns computed row by row from these rows (or some of them: a filter)."""
        return replace(self, sql=sql, columns=tuple(columns))


class _Engine:
    """One DuckDB connection (in memory, spilling to ``temp_directory``) and the names it hands out."""

    def __init__(self, memory_limit: str, temp_directory: Path | None) -> None:
        self.memory_bytes = _bytes(memory_limit)
        config: dict[str, str | bool | int | float | list[str]] = {
            "memory_limit": memory_limit,
            "preserve_insertion_order": True,  # scans and filters keep the file's row order
            "arrow_large_buffer_size": True,  # text as large_string, the type pandas writes
        }
        self._temp_directory = temp_directory
        self._work: Path | None = None  # where written-out tables go (made when needed, removed on close)
        if temp_directory is not None:
            temp_directory.mkdir(parents=True, exist_ok=True)
            config["temp_directory"] = str(temp_directory)
        self.connection = duckdb.connect(config=config)
        # Statement progress tracked for Progress (duckdb_fraction), never printed.
        self.connection.execute("SET enable_progress_bar = true; SET enable_progress_bar_print = false")
        self._names = count()

    def __enter__(self) -> _Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.connection.close()
        finally:
            if self._work is not None:
                shutil.rmtree(self._work, ignore_errors=True)

    def materialise(self, table: _Table, keep: Iterable[str] | None = None) -> _Table:
        """The table with no join left in its query (so it can be read in row order).

        A join and an ``ORDER BY`` in one DuckDB pipeline can exhaust ``memory_limit`` (the hash
        table's pinned partitions leave the sort no room to spill: seen at 10M rows in 256 MB), and
        every pass over a join runs the join again. So a table with a join in its query is written
        out once, unsorted, to a Parquet file in the work directory and read back from there:
        sorting a scan spills fine. Only the columns ``keep`` names (refs; default: all) are
        written, because a join costs with the width of what it carries; the table still *names*
        the others (error messages list them), but no later query may read them.
        """
        if not table.joins:
            return table
        if self._work is None:
            assert self._temp_directory is not None, "writing a table out needs a temp directory"
            self._work = Path(tempfile.mkdtemp(prefix="derive-", dir=self._temp_directory))
        file = self._work / f"{self.new_ref()}.parquet"
        path = _text(str(file))
        kept = {c.ref for c in table.columns if c.stored and (keep is None or c.ref in keep)}
        columns = ", ".join(["__row", *(c.ref for c in table.columns if c.ref in kept)])
        stored = tuple(replace(c, stored=c.ref in kept) for c in table.columns)
        if table.positional is not None and self._write_positional(table.positional, kept, file):
            # written in the left side's row order: read back in order with no sort
            return replace(
                table,
                sql=f"SELECT {columns} FROM read_parquet({path})",
                columns=stored,
                joins=False,
                ordered=True,
                positional=None,
            )
        self.connection.execute("SET preserve_insertion_order = false")  # its order is __row's job
        try:
            self.connection.execute(
                f"COPY (SELECT {columns} FROM ({table.sql}) AS t) TO {path} (FORMAT parquet, COMPRESSION lz4_raw)"
            )
        finally:
            self.connection.execute("SET preserve_insertion_order = true")
        return replace(table, sql=f"SELECT {columns} FROM read_parquet({path})", columns=stored, joins=False)

    def _write_positional(self, join: _PositionalJoin, kept: set[str], out_path: Path) -> bool:
        """Write the join matched by positions; False (nothing written) when a text column of the
        right side would hold more than the memory limit: the caller lets DuckDB join then."""
        assert self._work is not None
        text = [c for c in join.extra if c.ref in kept and c.dtype == "string"]
        sizes: dict[str, int] = {}
        if text:
            totals = self.one(f"SELECT {', '.join(f'sum(strlen({c.ref}))' for c in text)} FROM ({join.right.sql}) AS t")
            sizes = {c.ref: int(total or 0) for c, total in zip(text, totals, strict=True)}
            widest = max(size + 9 * join.right_rows for size in sizes.values())
            if join_memory(len(join.positions), join.right_rows, widest) > self.memory_bytes:
                return False
        right_dtypes = {c.ref: c.dtype for c in join.right.columns}  # extra's names may carry a suffix
        expressions = ["__row"]
        for column in join.left.columns:
            if column.name == join.on:
                if join.key.ref in kept:
                    expressions.append(f"{column.as_text} AS {join.key.ref}")
            elif column.ref in kept:
                expressions.append(column.ref)
        gathered = [
            GatheredColumn(
                c.ref,
                join.right.select([c.ref], ordered=True),
                join.right_rows,
                sizes.get(c.ref),
                to_float=c.dtype == "float64" and right_dtypes[c.ref] == "int64",
            )
            for c in join.extra
            if c.ref in kept
        ]
        write_joined(
            self.batches,
            join.positions,
            left_sql=join.left.select(expressions, ordered=True),
            gathered=gathered,
            inner=join.inner,
            out_path=out_path,
            work_directory=self._work,
        )
        return True

    def new_ref(self) -> str:
        return f"c{next(self._names)}"

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.connection.execute(sql).fetchall()

    def one(self, sql: str) -> tuple[Any, ...]:
        (row,) = self.connection.execute(sql).fetchall()
        return row

    def batches(self, sql: str, rows: int) -> Iterator[pa.RecordBatch]:
        yield from self.connection.sql(sql).to_arrow_reader(rows)

    def scan(self, source: ParquetInput) -> _Table:
        table = self.scan_file(source.path, source.key_column, key_unique=source.key_unique)
        dtypes = [column["dtype"] for column in source.columns]
        if [column["name"] for column in source.columns] != table.names or any(
            dtype != column.dtype for dtype, column in zip(dtypes, table.columns, strict=True)
        ):
            raise ValueError(f"{source.path} does not hold the columns {source.columns!r}")
        return table

    def scan_file(self, path: Path, key_column: str | None = None, *, key_unique: bool = False) -> _Table:
        """A Parquet file as a table. DuckDB renames columns whose names differ only in case
        (``a``, ``A`` -> ``a``, ``A_1``), so its names are matched to the file's by position."""
        source = f"read_parquet({_text(str(path))})"
        described = self.rows(f"DESCRIBE SELECT * FROM {source}")
        names = pq.read_schema(path).names
        if len(described) != len(names):
            raise ValueError(f"{path}: DuckDB sees {len(described)} columns, Arrow {len(names)}")
        columns, expressions = [], []
        for name, (duck_name, duck_type, *_) in zip(names, described, strict=True):
            dtype = _DTYPES.get(duck_type)
            if dtype is None:
                raise ValueError(f"{path}: column {name!r} is {duck_type}, not a dataset column type")
            column = _Column(name, dtype, self.new_ref())
            value = _identifier(duck_name)
            # A NaN is a missing value to pandas: the same here (pandas itself writes them as nulls).
            expressions.append(
                f"nullif({value}, {_NAN}) AS {column.ref}" if dtype == "float64" else f"{value} AS {column.ref}"
            )
            columns.append(column)
        # The row number: the virtual column, unless a column of the file has that name.
        shadowed = any(duck_name.lower() == "file_row_number" for duck_name, *_ in described)
        row = "row_number() OVER () - 1" if shadowed else "file_row_number"
        sql = f"SELECT {', '.join([f'{row} AS __row', *expressions])} FROM {source}"
        return _Table(sql, tuple(columns), key_column, ordered=True, key_unique=key_unique and key_column is not None)


_DTYPES = {"BIGINT": "int64", "DOUBLE": "float64", "VARCHAR": "string"}


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _double(value: float) -> str:
    """A float as a DOUBLE literal, exactly (``repr`` round-trips; a bare ``0.1`` would be DECIMAL)."""
    return f"CAST('{float(value)!r}' AS DOUBLE)"


# --- steps ---------------------------------------------------------------------------------------


def _apply(
    engine: _Engine, table: _Table, step: DeriveStep, inputs: Mapping[str, ParquetInput]
) -> tuple[_Table, FittedStep]:
    if isinstance(step, JoinStep):
        return _join(engine, table, step, inputs)
    if isinstance(step, ScaleStep):
        scale = FittedScale.of(step, _fit_scale(engine, table, step))
        return _scaled(table, scale), scale
    if isinstance(step, FillNaStep):
        fill = FittedFillNa(values=_fit_fill(engine, table, step))
        return _filled(table, fill.values), fill
    if isinstance(step, DropNaStep):
        return _dropna(table, step), FittedDropNa.of(step)
    shape: FittedSelect | FittedDrop | FittedRename
    if isinstance(step, SelectStep):
        shape = FittedSelect.of(step)  # a name repeated is stored once
    elif isinstance(step, DropStep):
        shape = FittedDrop.of(step)
    elif isinstance(step, RenameStep):
        shape = FittedRename.of(step)
    else:
        raise InvalidInput(f"unknown step {step.op!r}")
    return _shape_step(table, shape), shape


class _Unfollowable(Exception):
    """A step :func:`_live_refs` cannot follow by names alone (it will refuse)."""


def _live_refs(table: _Table, later: Sequence[DeriveStep], inputs: Mapping[str, ParquetInput]) -> set[str]:
    """Refs of ``table``'s columns that the ``later`` steps may read or that may reach the result.

    A run over names only: a column is dead once a ``select`` leaves it out or a ``drop`` removes it
    before any step reads it (``fillna`` without columns and ``dropna`` without columns read them
    all). A step the run cannot follow (it names a column that is not there...) will refuse, but
    every column is kept then all the same.
    """
    everything = {c.ref for c in table.columns}
    names: dict[str, str | None] = {c.name: c.ref for c in table.columns}  # None: joined in later
    key = table.key_column
    live: set[str] = set()

    def read(columns: Iterable[str]) -> None:
        for name in columns:
            if name not in names:
                raise _Unfollowable(name)
            live.update(ref for ref in (names[name],) if ref is not None)

    try:
        for step in later:
            if isinstance(step, JoinStep):
                source = inputs.get(step.dataset_id)
                if source is None:
                    raise _Unfollowable(step.dataset_id)
                right = [column["name"] for column in source.columns]
                try:
                    join = FittedJoin.resolve(step, key, list(names), source.key_column, right)
                except InvalidInput:
                    raise _Unfollowable(step.dataset_id) from None
                read([join.left_on])
                names = {join.left_name(name): ref for name, ref in names.items()}
                names.update({join.right_name(name): None for name in right if name != join.right_on})
                key = join.key_column(key)
            elif isinstance(step, ScaleStep):
                read(step.columns)
            elif isinstance(step, FillNaStep):
                read(step.columns or list(names))
            elif isinstance(step, DropNaStep):
                read(list(names) if step.columns is None else step.columns)
            elif isinstance(step, SelectStep):
                kept = list(dict.fromkeys(step.columns))
                if any(name not in names for name in kept):
                    raise _Unfollowable(step.op)
                if key and key not in kept:
                    kept.insert(0, key)
                names = {name: names[name] for name in kept}
            elif isinstance(step, DropStep):
                if any(name not in names for name in step.columns):
                    raise _Unfollowable(step.op)
                names = {name: ref for name, ref in names.items() if name not in step.columns}
                key = None if key in step.columns else key
            elif isinstance(step, RenameStep):
                renamed = {step.mapping.get(name, name): ref for name, ref in names.items()}
                if any(name not in names for name in step.mapping) or len(renamed) != len(names):
                    raise _Unfollowable(step.op)
                names = renamed
                key = step.mapping.get(key, key) if key else None
    except _Unfollowable:
        return everything
    return live | {ref for ref in names.values() if ref is not None}


def _require_columns(table: _Table, columns: Sequence[str], purpose: str) -> None:
    names = table.names
    missing = [name for name in columns if name not in names]
    if missing:
        raise InvalidInput(
            f"{purpose}: unknown column(s) {', '.join(map(repr, missing))}",
            details={"missing": missing, "columns": names},
        )


def _require_numeric(engine: _Engine, table: _Table, columns: Sequence[str], purpose: str) -> None:
    _require_columns(table, columns, purpose)
    for name in columns:
        _require_feature(engine, table, name, purpose)


def _require_feature(engine: _Engine, table: _Table, name: str, purpose: str) -> None:
    """One column of :func:`_require_numeric`: not the key, and numeric (else name bad cells)."""
    if name == table.key_column:
        raise InvalidInput(f"{purpose}: {name!r} is the key column, not a feature", details={"column": name})
    column = table.column(name)
    if not column.numeric:
        bad = _non_numeric_cells(engine, table, column)
        example = f": row {bad[0]['row']} holds {bad[0]['value']!r}" if bad else ""
        raise InvalidInput(
            f"{purpose}: column {name!r} is not numeric{example}", details={"column": name, "cells": bad}
        )


def _non_numeric_cells(engine: _Engine, table: _Table, column: _Column, limit: int = 5) -> list[dict[str, object]]:
    """:func:`parsing.non_numeric_cells`: the first ``limit`` text cells that are not numbers.

    DuckDB proposes the cells RE2 cannot vouch for, a page at a time in row order; ``parse_number``
    (Python's ``re``, Unicode digits included) decides. Their positions are counted in one pass.
    """
    found: list[tuple[int, str]] = []
    after = -1
    while len(found) < limit:
        page = engine.rows(
            f"SELECT __row, {column.ref} FROM ({table.sql}) AS t WHERE {column.ref} IS NOT NULL"
            f" AND NOT regexp_full_match({column.ref}, {_text(_SURELY_NUMBER_RE2)}) AND __row > {after}"
            f" ORDER BY __row LIMIT {_PAGE_ROWS}"
        )
        found += [(row, value) for row, value in page if parse_number(value) is None][: limit - len(found)]
        if len(page) < _PAGE_ROWS:
            break
        after = page[-1][0]
    if not found:
        return []
    counts = ", ".join(f"count(*) FILTER (WHERE __row < {row})" for row, _ in found)
    positions = engine.one(f"SELECT {counts} FROM ({table.sql}) AS t")
    return [{"row": int(position), "value": str(value)} for position, (_, value) in zip(positions, found, strict=True)]


def _duplicates(engine: _Engine, table: _Table, column: _Column, limit: int = 100) -> list[str]:
    """``[str(v) for v in s[s.duplicated()].unique()][:limit]``: each value seen twice, in the order
    of its second occurrence, as pandas prints it (a null is ``<NA>`` in text, ``nan`` in numbers)."""
    source = f"FROM ({table.sql}) AS t GROUP BY {column.ref} HAVING count(*) > 1"
    if not engine.rows(f"SELECT 1 {source} LIMIT 1"):
        return []
    rows = engine.rows(
        f"SELECT {column.ref} IS NULL, min_by({column.ref}, __row, 2)[2], min(__row, 2)[2] AS second {source}"
        f" ORDER BY second LIMIT {limit}"
    )
    missing = "<NA>" if column.dtype == "string" else "nan"
    return [missing if is_null else str(value) for is_null, value, _ in rows]


def _join(
    engine: _Engine, left: _Table, step: JoinStep, inputs: Mapping[str, ParquetInput]
) -> tuple[_Table, FittedStep]:
    """Inner or left join, 1:1 (duplicates refused), keeping the left side's row order."""
    source = inputs[step.dataset_id]
    right = engine.scan(source)
    record = FittedJoin.resolve(step, left.key_column, left.names, source.key_column, right.names)
    left_on, right_on = record.left_on, record.right_on
    for name, table, side in ((left_on, left, "this dataset"), (right_on, right, f"dataset {step.dataset_id}")):
        known_unique = name == table.key_column and table.key_unique
        duplicated = [] if known_unique else _duplicates(engine, table, table.column(name))
        if duplicated:
            raise InvalidInput(
                f"join column {name!r} has duplicate values in {side}: {', '.join(duplicated[:10])}",
                details={"on": name, "duplicates": duplicated},
            )
    key = _Column(left_on, "string", engine.new_ref())

    def sides(how: str) -> str:
        return (
            f"(SELECT *, {left.column(left_on).as_text} AS __key FROM ({left.sql}) AS t) AS l"
            f" {how} JOIN (SELECT *, {right.column(right_on).as_text} AS __key FROM ({right.sql}) AS t) AS r"
            " ON l.__key IS NOT DISTINCT FROM r.__key"  # pandas matches a missing value with a missing one
        )

    extra = [column for column in right.columns if column.name != right_on]
    matched = _match_by_positions(engine, left, right, left_on, right_on)
    # pandas gives the other side's int64 columns NaN, so float64, when a left row finds no match.
    widen = (
        step.how == "left"
        and any(column.dtype == "int64" for column in extra)
        and (
            bool((matched.positions < 0).any())
            if matched is not None
            else bool(engine.rows(f"SELECT 1 FROM {sides('ANTI')} LIMIT 1"))
        )
    )
    expressions = ["l.__row AS __row"]
    columns = []
    for column in left.columns:
        if column.name == left_on:
            column = key
            expressions.append(f"l.__key AS {key.ref}")
        else:
            if column.stored:
                expressions.append(f"l.{column.ref} AS {column.ref}")
            column = replace(column, name=record.left_name(column.name))  # a suffix, maybe
        columns.append(column)
    for column in extra:
        if widen and column.dtype == "int64":
            expressions.append(f"CAST(r.{column.ref} AS DOUBLE) AS {column.ref}")
            column = replace(column, dtype="float64")
        else:
            expressions.append(f"r.{column.ref} AS {column.ref}")
        columns.append(replace(column, name=record.right_name(column.name)))
    sql = f"SELECT {', '.join(expressions)} FROM {sides(step.how.upper())}"
    # Each left row is kept at most once: a unique left key stays unique. The join column as key
    # may hold a null (a single one passes the duplicate check): the final key check decides.
    key_unique = left.key_unique if left.key_column else False
    positional = None
    if matched is not None:
        joined = {column.ref for column in extra}
        positional = _PositionalJoin(
            left,
            right,
            left_on,
            key,
            tuple(column for column in columns if column.ref in joined),
            step.how == "inner",
            matched.positions,
            matched.right_rows,
        )
    table = _Table(
        sql,
        tuple(columns),
        record.key_column(left.key_column),
        ordered=False,
        key_unique=key_unique,
        joins=True,
        positional=positional,
    )
    return table, record


@dataclass(frozen=True, eq=False)
class _Matched:
    positions: np.ndarray
    right_rows: int


def _match_by_positions(engine: _Engine, left: _Table, right: _Table, left_on: str, right_on: str) -> _Matched | None:
    """The join matched by :mod:`positional_join`, or None when DuckDB's hash join must do it: an
    empty side, a pair of the right side's values with one 64-bit hash, or more memory than the
    engine's limit (see ``join_memory``)."""
    left_key, right_key = left.column(left_on), right.column(right_on)
    (right_rows,) = engine.one(f"SELECT count(*) FROM ({right.sql}) AS t")  # Parquet metadata: free
    left_rows, last_row = engine.one(f"SELECT count(*), max(__row) FROM ({left.sql}) AS t")
    if not left_rows or not right_rows:
        return None
    value = right_key.as_text
    index = "INTEGER" if max(right_rows, last_row + 1) < 2**31 else "BIGINT"
    # The right side is a stored dataset's scan: its __row is the row's position.
    positions = match_positions(
        engine.batches,
        right_sorted=f"SELECT hash({value}) AS h, strlen({value}), CAST(__row AS {index}) "
        f"FROM ({right.sql}) AS t ORDER BY h",
        left_sorted=f"SELECT hash({left_key.as_text}) AS h, CAST(__row AS {index}) FROM ({left.sql}) AS t ORDER BY h",
        left_order=left.select([f"CAST(__row AS {index})"], ordered=True),
        left_values=left.select([left_key.as_text], ordered=True),
        right_values=right.select([value], ordered=True),
        left_rows=left_rows,
        right_rows=right_rows,
        row_limit=last_row + 1,
        budget=engine.memory_bytes,
    )
    return None if positions is None else _Matched(positions, right_rows)


def _fit_scale(engine: _Engine, table: _Table, step: ScaleStep) -> dict[str, ColumnScale]:
    """``fit_scale``: min/max from DuckDB (exact), mean/std as numpy computes them (streamed)."""
    _require_numeric(engine, table, step.columns, "scale")
    columns = [table.column(name) for name in dict.fromkeys(step.columns)]
    minmax = step.method == "minmax"
    aggregates = [
        f"count({c.as_double}), min({c.as_double}), max({c.as_double})" if minmax else f"count({c.ref})"
        for c in columns
    ]
    row = engine.one(table.select(aggregates, ordered=False))
    width = 3 if minmax else 1
    stats = {c.name: row[i * width : (i + 1) * width] for i, c in enumerate(columns)}
    moments: dict[str, tuple[float, float]] = {}
    if not minmax:
        present = [c for c in columns if stats[c.name][0] > 0]
        moments = _mean_and_std(engine, table, present, {c.name: stats[c.name][0] for c in present})
    params: dict[str, ColumnScale] = {}
    for name in step.columns:
        if stats[name][0] == 0:
            raise InvalidInput(f"scale: column {name!r} has no values", details={"column": name})
        if minmax:
            params[name] = minmax_params(name, float(stats[name][1]), float(stats[name][2]))
        else:
            params[name] = standard_params(name, *moments[name])
    return params


def _mean_and_std(
    engine: _Engine, table: _Table, columns: Sequence[_Column], counts: Mapping[str, int]
) -> dict[str, tuple[float, float]]:
    """numpy's ``values.mean()`` and ``values.std(ddof=0)`` of each column's non-null values, as
    float64 in row order: two streamed passes (the sum, then the squared deviations' sum)."""
    if not columns:
        return {}
    source = engine.materialise(table.narrow(columns))  # no-op: derive_parquet wrote joins out
    sums = _stream_sums(engine, source, columns, counts, lambda name, values: values)
    means = {name: total / counts[name] for name, total in sums.items()}

    def squares(name: str, values: np.ndarray) -> np.ndarray:
        deviations = values - means[name]
        with np.errstate(over="ignore", invalid="ignore"):  # inf, as numpy's std gives (it warns)
            return np.multiply(deviations, deviations, out=deviations)

    squared = _stream_sums(engine, source, columns, counts, squares)
    return {name: (means[name], math.sqrt(squared[name] / counts[name])) for name in sums}


def _stream_sums(
    engine: _Engine,
    table: _Table,
    columns: Sequence[_Column],
    counts: Mapping[str, int],
    transform: Callable[[str, np.ndarray], np.ndarray],
    *,
    nulls_as_zero: bool = False,
) -> dict[str, float]:
    """numpy's sum of each column's values streamed in row order (``transform(name, values)`` first).

    By default the non-null values as float64 (``dropna().to_numpy("float64")``; ``counts`` gives
    how many); with ``nulls_as_zero`` every row, nulls as 0.0 (pandas' ``nanmean``), and ``int64``
    columns summed the way numpy sums an integer array with ``dtype=float64`` (buffer by buffer).
    """
    if not columns:
        return {}
    summers = {
        c.name: PairwiseSum(counts[c.name], segment=np.getbufsize() if nulls_as_zero and c.dtype == "int64" else None)
        for c in columns
    }
    sql = table.select([c.ref if nulls_as_zero else c.as_double for c in columns], ordered=True)
    for batch in engine.batches(sql, STREAM_BATCH_ROWS):
        for c, array in zip(columns, batch.columns, strict=True):
            if nulls_as_zero:
                values = array.fill_null(0).to_numpy().astype(np.float64, copy=False)
            else:
                values = array.drop_null().to_numpy()
            summers[c.name].add(transform(c.name, values))
    return {name: summer.total() for name, summer in summers.items()}


def _scaled(table: _Table, record: FittedScale) -> _Table:
    """``FittedScale.apply``: the formula of ``scale_values`` in the same order of float operations."""
    replaced: dict[str, tuple[str, str]] = {}
    for name, params in record.params.items():
        value = table.column(name).as_double
        if isinstance(params, MinMaxParams):
            low, high = record.feature_range
            formula = (
                f"{_double(low)} + (({value} - {_double(params.min)}) * {_double(high - low)})"
                f" / {_double(params.max - params.min)}"
            )
        else:
            formula = f"({value} - {_double(params.mean)}) / {_double(params.std)}"
        # A NaN result (inf - inf, inf / inf) is a missing value to pandas, which writes it as null.
        replaced[name] = (f"nullif({formula}, {_NAN})", "float64")
    return _replace(table, replaced)


def _replace(table: _Table, computed: Mapping[str, tuple[str, str]]) -> _Table:
    """The table with some columns recomputed: name -> (SQL expression, dtype); same positions."""
    selected = ["__row"]
    columns = []
    for column in table.columns:
        if column.name in computed:
            assert column.stored, column
            expression, dtype = computed[column.name]
            selected.append(f"{expression} AS {column.ref}")
            column = replace(column, dtype=dtype)
        elif column.stored:
            selected.append(column.ref)
        columns.append(column)
    # A key column is never scaled; filling it changes nothing when it is known to hold no null.
    return table.with_sql(table.select(selected, ordered=False), columns)


def _fit_fill(engine: _Engine, table: _Table, step: FillNaStep) -> dict[str, FillValue]:
    """``FittedFillNa.fit``: the columns with nulls (one aggregation) and each one's value."""
    columns = step.columns or _columns_with_nulls(engine, table)
    _require_columns(table, columns, "fillna")
    if step.strategy == "constant" and step.value is None:
        raise InvalidInput("fillna: `value` is required with strategy `constant`")
    if step.strategy == "constant" and isinstance(step.value, int) and not _fits_a_float(step.value):
        raise InvalidInput(
            f"fillna: `value` ({_describe_integer(step.value)}) is beyond the range of a 64-bit float (about 1.8e308)",
            details={"field": "value", "limit": "1.7976931348623157e308"},
        )
    if step.strategy == "mean":
        return dict(_fit_means(engine, table, columns))
    values: dict[str, FillValue] = {}
    for name in columns:
        numeric = table.column(name).numeric
        if numeric != isinstance(step.value, int | float):
            kind = "a number" if numeric else "text"
            raise InvalidInput(f"fillna: column {name!r} needs {kind} as `value`", details={"column": name})
        if step.value is not None:  # (refused above when None)
            values[name] = step.value
    return values


def _columns_with_nulls(engine: _Engine, table: _Table) -> list[str]:
    candidates = [c for c in table.columns if c.name != table.key_column and c.dtype != "int64"]
    if not candidates:
        return []
    flags = engine.one(table.select([f"bool_or({c.ref} IS NULL)" for c in candidates], ordered=False))
    return [c.name for c, flag in zip(candidates, flags, strict=True) if flag]


def _fit_means(engine: _Engine, table: _Table, columns: Sequence[str]) -> dict[str, float]:
    """pandas' ``Series.mean()`` of each column, refusing like ``_fit_fill`` in column order."""
    numeric = [table.column(name) for name in dict.fromkeys(columns)]
    numeric = [c for c in numeric if c.numeric and c.name != table.key_column]
    present: dict[str, int] = {}
    rows = 0
    if numeric:
        row = engine.one(table.select(["count(*)", *(f"count({c.ref})" for c in numeric)], ordered=False))
        rows = row[0]
        present = {c.name: n for c, n in zip(numeric, row[1:], strict=True)}
    for name in columns:
        _require_feature(engine, table, name, "fillna mean")
        if present[name] == 0:
            raise InvalidInput(f"fillna: column {name!r} has no values to average", details={"column": name})
    # nanmean: the sum over every row (nulls as 0), divided by the count of values.
    source = engine.materialise(table.narrow(numeric)) if numeric else table  # no-op (see above)
    sums = _stream_sums(engine, source, numeric, {c.name: rows for c in numeric}, lambda _, v: v, nulls_as_zero=True)
    return {name: float(sums[name] / present[name]) for name in dict.fromkeys(columns)}


def _filled(table: _Table, values: Mapping[str, FillValue]) -> _Table:
    """``FittedFillNa.apply``: numeric columns become float64 (filled or not), text keeps its type."""
    computed: dict[str, tuple[str, str]] = {}
    for name, value in values.items():
        column = table.column(name)
        if column.numeric:  # (the fit gave a numeric column a number, text a text column)
            computed[name] = (f"coalesce({column.as_double}, {_double(float(value))})", "float64")
        else:
            computed[name] = (f"coalesce({column.ref}, {_text(str(value))})", "string")
    return _replace(table, computed)


def _dropna(table: _Table, step: DropNaStep) -> _Table:
    if step.columns:
        _require_columns(table, step.columns, "dropna")
    subset = table.columns if step.columns is None else [table.column(name) for name in step.columns]
    conditions = [f"{c.ref} IS NOT NULL" for c in dict.fromkeys(subset) if c.dtype != "int64"]
    if not conditions:
        return table
    return table.with_sql(f"SELECT * FROM ({table.sql}) AS t WHERE {' AND '.join(conditions)}", table.columns)


def _shape_step(table: _Table, record: FittedSelect | FittedDrop | FittedRename) -> _Table:
    """``apply`` of ``select``, ``drop`` and ``rename``: they change the columns named, not the query."""
    if isinstance(record, FittedSelect):
        names = list(dict.fromkeys(record.columns))
        _require_columns(table, names, "select")
        if table.key_column and table.key_column not in names:
            names.insert(0, table.key_column)
        return table.with_columns([table.column(name) for name in names], table.key_column)
    if isinstance(record, FittedDrop):
        _require_columns(table, record.columns, "drop")
        key = None if table.key_column in record.columns else table.key_column
        return table.with_columns([c for c in table.columns if c.name not in record.columns], key)
    mapping = record.mapping
    _require_columns(table, list(mapping), "rename")
    check_column_names(list(mapping.values()))
    renamed = [mapping.get(name, name) for name in table.names]
    clashes = sorted({name for name in renamed if renamed.count(name) > 1})
    if clashes:
        raise InvalidInput(f"rename: would create duplicate column(s) {clashes}", details={"columns": clashes})
    key = mapping.get(table.key_column, table.key_column) if table.key_column else None
    columns = [replace(c, name=mapping.get(c.name, c.name)) for c in table.columns]
    return table.with_columns(columns, key)


# --- the result ----------------------------------------------------------------------------------


def _write(engine: _Engine, table: _Table, out_path: Path, row_group_rows: int, progress: Progress) -> int:
    """Stream the table into ``out_path`` in row groups of ``row_group_rows``; its row count.

    Refuses an empty result like ``apply_steps`` (only after writing it: the count is known then).
    """
    if not table.columns:
        (rows,) = engine.one(f"SELECT count(*) FROM ({table.sql}) AS t")
        raise InvalidInput(NO_ROWS_OR_COLUMNS, details={"shape": [rows, 0]})
    table = engine.materialise(table)  # no-op: derive_parquet wrote joins out
    assert all(column.stored for column in table.columns), "a column of the result was not kept"
    # The rows to come: free for a scan (Parquet metadata), one pass over the filtered columns else.
    (expected,) = engine.one(f"SELECT count(*) FROM ({table.sql}) AS t")
    progress.stage("writing", total=int(expected))
    schema = pandas_schema([{"name": c.name, "dtype": c.dtype} for c in table.columns])
    rows = 0
    # pandas' defaults (snappy, dictionaries) for text; numbers neither dictionary-encoded nor
    # compressed (as uploads store them): on distinct floats both only cost time (snappy saves ~1%),
    # and readers see the same data.
    # The key column is unique: a dictionary of it could never be smaller than its values.
    text = [c.name for c in table.columns if c.dtype == "string" and c.name != table.key_column]
    compression = {column.name: "snappy" if column.dtype == "string" else "none" for column in table.columns}
    # DuckDB fills large batches on both cores; small ones cost it twice the time (they are regrouped)
    batch_rows = max(row_group_rows, min(4 * row_group_rows, 1 << 18))
    batches = engine.batches(table.select([c.ref for c in table.columns], ordered=True), batch_rows)
    with (
        pq.ParquetWriter(out_path, schema, use_dictionary=text, compression=compression) as writer,
        ThreadPoolExecutor(1, thread_name_prefix="parquet-writer") as background,
    ):
        # One row group is encoded on the background thread while DuckDB produces the next.
        writing: Future[None] | None = None
        for group in _row_groups(batches, schema, row_group_rows):
            if writing is not None:
                writing.result()
            writing = background.submit(writer.write_table, group, row_group_rows)
            rows += group.num_rows
            progress.advance(rows)
            progress.rows_written(rows)
        if writing is not None:
            writing.result()
    if rows == 0:
        raise InvalidInput(NO_ROWS_OR_COLUMNS, details={"shape": [0, len(table.columns)]})
    return rows


def _row_groups(batches: Iterator[pa.RecordBatch], schema: pa.Schema, rows: int) -> Iterator[pa.Table]:
    """Batches regrouped into tables of exactly ``rows`` rows (the last one shorter), as ``schema``."""
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for batch in batches:
        pending.append(pa.RecordBatch.from_arrays(batch.columns, schema=schema))
        pending_rows += batch.num_rows
        while pending_rows >= rows:
            table = pa.Table.from_batches(pending, schema=schema)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, pending_rows = rest.to_batches(), rest.num_rows
    if pending_rows:
        yield pa.Table.from_batches(pending, schema=schema)


def pandas_schema(columns: Sequence[Mapping[str, str]]) -> pa.Schema:
    """The Arrow schema ``DataFrame.to_parquet`` writes for columns ``{"name", "dtype"}`` (as
    ``DatasetTable.columns`` lists them), pandas metadata included: text is ``large_string`` read
    back as the ``string`` dtype."""
    empty = pd.DataFrame({c["name"]: pd.Series([], dtype=c["dtype"]) for c in columns})
    return pa.Schema.from_pandas(empty, preserve_index=False)


def _check_key(engine: _Engine, table: _Table, key_column: str) -> None:
    """``parsing.check_key`` on a table read in file order (``__row`` is the row's position)."""
    key = table.column(key_column)
    (first_empty,) = engine.one(f"SELECT min(__row) FROM ({table.sql}) AS t WHERE {key.ref} IS NULL")
    if first_empty is not None:
        row = int(first_empty)
        raise InvalidInput(f"key column {key_column!r} is empty in row {row}", details={"row": row})
    duplicated = _duplicates(engine, table, key)
    if duplicated:
        raise InvalidInput(
            f"key column {key_column!r} has duplicate values: {', '.join(duplicated[:10])}",
            details={"key_column": key_column, "duplicates": duplicated},
        )


# --- numpy's float64 sum, streamed ------------------------------------------------------------------


_BLOCK = 128  # numpy's PW_BLOCKSIZE
_UNROLL = 8


class PairwiseSum:
    """``np.add.reduce`` of ``n`` float64 values fed in order, chunk by chunk, bit for bit.

    numpy sums a contiguous float64 array pairwise: a run of at most 128 values with eight
    interleaved accumulators (fewer than 8 values: one, starting from -0.0), a longer run as the sum
    of its halves, the first half rounded down to a multiple of 8. That tree depends only on ``n``,
    so its leaves (runs of 64 to 128 values) are summed as soon as their values have arrived, many
    at once with numpy, and the tree is folded at the end; the reduction's result is ``0.0 + root``.

    With ``segment``, the sum is the one numpy computes for an integer array reduced with
    ``dtype=float64``: cast in buffers of ``segment`` values (``np.getbufsize()``), each summed
    pairwise and added in order to the running total.

    Memory: O(n / 64) floats for the leaves' sums, plus at most one leaf of carried-over values.
    """

    def __init__(self, n: int, segment: int | None = None) -> None:
        self.n = n
        if segment is None:
            plan = [(n, 1)] if n else []
        else:
            full, rest = divmod(n, segment)
            plan = [(segment, full)] if full else []
            if rest:
                plan.append((rest, 1))
        self._segments = [(_Tree.of(size), repeat) for size, repeat in plan]
        starts, sizes, offset = [], [], 0
        for tree, repeat in self._segments:
            shifts = offset + tree.size * np.arange(repeat, dtype=np.int64)
            starts.append((shifts[:, None] + tree.leaf_starts[None, :]).ravel())
            sizes.append(np.tile(tree.leaf_sizes, repeat))
            offset += tree.size * repeat
        self._starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        self._sizes = np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)
        self._ends = self._starts + self._sizes
        self._leaves = np.empty(self._starts.size, dtype=np.float64)
        self._done = 0  # leaves summed so far
        self._carry = np.zeros(0, dtype=np.float64)  # values of the next, incomplete leaf
        self._carry_start = 0
        self._fed = 0

    def add(self, values: np.ndarray) -> None:
        """Feed the next values (float64, in order)."""
        self._fed += values.size
        if self._fed > self.n:
            raise ValueError(f"fed {self._fed} values to a sum of {self.n}")
        buffer = np.concatenate((self._carry, values)) if self._carry.size else values
        end = self._carry_start + buffer.size
        first = self._done
        last = int(np.searchsorted(self._ends, end, side="right"))
        if last > first:
            offsets = self._starts[first:last] - self._carry_start
            sizes = self._sizes[first:last]
            out = self._leaves[first:last]
            for size in np.unique(sizes):
                chosen = sizes == size
                rows = buffer[offsets[chosen][:, None] + np.arange(size)]
                with np.errstate(over="ignore", invalid="ignore"):  # inf and nan, as in numpy's sum
                    out[chosen] = _block_sums(rows)
            consumed = int(self._ends[last - 1]) - self._carry_start
            buffer = buffer[consumed:]
            self._carry_start += consumed
            self._done = last
        self._carry = buffer.copy()

    def total(self) -> float:
        if self._fed != self.n or self._done != self._leaves.size:
            raise ValueError(f"fed {self._fed} of {self.n} values")
        totals = [np.zeros(1)]
        position = 0
        with np.errstate(over="ignore", invalid="ignore"):
            for tree, repeat in self._segments:
                leaves = tree.leaf_starts.size * repeat
                totals.append(tree.fold(self._leaves[position : position + leaves].reshape(repeat, -1)))
                position += leaves
            # The reduction starts from 0.0 and adds each segment's pairwise sum in order.
            return float(np.add.accumulate(np.concatenate(totals))[-1])


@dataclass(frozen=True)
class _Tree:
    """numpy's pairwise summation tree for ``size`` values: its leaves and how they fold."""

    size: int
    leaf_starts: np.ndarray
    leaf_sizes: np.ndarray
    levels: tuple[tuple[np.ndarray, np.ndarray], ...]  # per depth: which nodes split, leaf index of the others

    @staticmethod
    def of(size: int) -> _Tree:
        starts = np.zeros(1, dtype=np.int64)
        sizes = np.full(1, size, dtype=np.int64)
        raw: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        while True:
            split = sizes > _BLOCK
            raw.append((split, starts[~split], sizes[~split]))
            if not split.any():
                break
            half = sizes[split] // 2
            half -= half % _UNROLL
            starts = np.stack((starts[split], starts[split] + half), axis=1).ravel()
            sizes = np.stack((half, sizes[split] - half), axis=1).ravel()
        leaf_starts = np.concatenate([s for _, s, _ in raw])
        leaf_sizes = np.concatenate([z for _, _, z in raw])
        order = np.argsort(leaf_starts, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        levels, taken = [], 0
        for split, starts_, _ in raw:
            levels.append((split, rank[taken : taken + starts_.size]))
            taken += starts_.size
        return _Tree(size, leaf_starts[order], leaf_sizes[order], tuple(levels))

    def fold(self, leaves: np.ndarray) -> np.ndarray:
        """Root sums of trees whose leaf sums are the rows of ``leaves`` (leaves in start order)."""
        below = np.zeros((leaves.shape[0], 0))
        for split, leaf_index in reversed(self.levels):
            values = np.empty((leaves.shape[0], split.size))
            values[:, ~split] = leaves[:, leaf_index]
            values[:, split] = below[:, 0::2] + below[:, 1::2]
            below = values
        return below[:, 0]


def _block_sums(rows: np.ndarray) -> np.ndarray:
    """numpy's sum of each row of at most 128 values (``rows`` is leaves x size)."""
    size = rows.shape[1]
    if size < _UNROLL:
        result = np.full(rows.shape[0], -0.0)
        for i in range(size):
            result = result + rows[:, i]
        return result
    acc = rows[:, :_UNROLL].copy()
    end = size - size % _UNROLL
    for i in range(_UNROLL, end, _UNROLL):
        acc += rows[:, i : i + _UNROLL]
    result = ((acc[:, 0] + acc[:, 1]) + (acc[:, 2] + acc[:, 3])) + ((acc[:, 4] + acc[:, 5]) + (acc[:, 6] + acc[:, 7]))
    for i in range(end, size):
        result = result + rows[:, i]
    return result


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", re.IGNORECASE)


def _bytes(limit: str) -> int:
    """DuckDB's memory limit (``256MB``; DuckDB takes MB for MiB) in bytes."""
    match = _SIZE.fullmatch(limit)
    if match is None:
        raise ValueError(f"not a memory size: {limit!r}")
    return int(float(match.group(1)) * 1024 ** "BKMGT".index(match.group(2).upper() or "B"))
