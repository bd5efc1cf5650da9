"""The online feature path: prediction rows (JSON objects) straight to the model's float matrix.

A dataset's recipe is replayed on raw rows by :func:`service.datasets.transforms.replay`, which
works on DataFrames and suits batches. A prediction request of a few rows cannot afford that, so a
model's recipe is *compiled* once (when the model is loaded for serving) into one small program
per feature: the raw column it reads and the fitted steps applied to it, in order (scalings with
:func:`~service.datasets.transforms.scale_values` itself, and fills). Evaluating it is a handful
of numpy operations per feature column, with no DataFrame.

Exactness: each program applies the same formulas, in the same order, with the same float64
operands as the replay, so the compiled matrix equals the replayed one **bit for bit** (a property
test checks it on generated recipes and rows). Cells that are not plain numbers (numeric text such
as ``"1,210.5"``, text, ``NaN``) take the upload parser's own typing, so they get the same values
and the same errors as before.

A recipe is a DAG of datasets by reference (see :mod:`service.datasets.transforms`); compiling it
folds each dataset once, so a model trained many derives deep compiles in time linear in its
recipe, once per process, and evaluates in a handful of numpy operations per feature.

A recipe that cannot be traced column by column (none known today) falls back to the replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from service.datasets.parsing import _cell_text, _type_column, is_unicode_text, non_numeric_cells
from service.datasets.steps import (
    FittedDrop,
    FittedDropNa,
    FittedFillNa,
    FittedJoin,
    FittedRename,
    FittedScale,
    FittedSelect,
    FittedStep,
    parse_steps,
)
from service.datasets.transforms import Recipe, fold_recipe, input_ids, scale_values
from service.errors import InvalidInput

Row = dict[str, Any]
_PLAIN = frozenset({int, float, type(None)})
_UNKNOWN_SHOWN = 10


@dataclass(frozen=True)
class Step:
    """One fitted step of a feature's program: ``scale`` (method, params, range) or ``fill``."""

    op: str
    method: str = ""
    params: tuple[tuple[str, float], ...] = ()
    feature_range: tuple[float, ...] = ()
    value: float = 0.0

    def apply(self, values: np.ndarray) -> np.ndarray:
        if self.op == "scale":
            return scale_values(values, self.method, dict(self.params), self.feature_range)
        return np.where(np.isnan(values), self.value, values)


@dataclass(frozen=True)
class Program:
    """How one model feature is computed from one raw column."""

    feature: str
    raw_name: str
    steps: tuple[Step, ...]


class NotCompilable(Exception):
    """The recipe cannot be compiled per column (the caller falls back to the DataFrame replay)."""


@dataclass(frozen=True)
class CompiledRecipe:
    """A model's recipe as per-feature programs, plus the raw columns requests may carry."""

    programs: tuple[Program, ...] | None
    accepted: frozenset[str]
    key_column: str | None
    recipe: Recipe | None

    def matrix(self, rows: Sequence[Row], what: str = "rows") -> np.ndarray:
        """The (len(rows), features) finite float64 matrix; InvalidInput names the first problem."""
        return self._evaluate(_present_columns(rows), lambda name: numeric_column(name, rows), len(rows), what)

    def frame_matrix(self, frame: pd.DataFrame, what: str) -> np.ndarray:
        """The same for a stored dataset's columns (already typed)."""
        return self._evaluate(set(frame.columns), lambda name: _frame_column(frame, name, what), len(frame), what)

    def _evaluate(self, present: set[str], column: Callable[[str], np.ndarray], length: int, what: str) -> np.ndarray:
        if self.programs is None:
            raise NotCompilable
        missing = [p.feature for p in self.programs if p.raw_name not in present]
        if missing:
            raise InvalidInput(
                f"{what} lack the model's feature(s) {', '.join(map(repr, missing))}",
                details={"missing": missing, "feature_names": [p.feature for p in self.programs]},
            )
        out = np.empty((length, len(self.programs)), dtype=np.float64)
        columns: dict[str, np.ndarray] = {}
        for index, program in enumerate(self.programs):
            values = columns.get(program.raw_name)
            if values is None:
                values = columns[program.raw_name] = column(program.raw_name)
            for step in program.steps:
                values = step.apply(values)
            out[:, index] = values
        bad = ~np.isfinite(out)
        if bad.any():
            row, position = (int(i) for i in np.argwhere(bad)[0])
            name = self.programs[position].feature
            raise InvalidInput(
                f"{what}: row {row} column {name!r} is missing or not a finite number",
                details={"row": row, "column": name},
            )
        return out


def _frame_column(frame: pd.DataFrame, name: str, what: str) -> np.ndarray:
    series = frame[name]
    if not pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        bad = non_numeric_cells(frame, name)
        example = f": row {bad[0]['row']} holds {bad[0]['value']!r}" if bad else ""
        raise InvalidInput(f"{what}: column {name!r} is not numeric{example}", details={"column": name, "cells": bad})
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def identity_recipe(feature_names: Sequence[str], key_column: str | None) -> CompiledRecipe:
    """Rows already in the model's units: each feature is read as it is."""
    programs = tuple(Program(name, name, ()) for name in feature_names)
    accepted = frozenset(feature_names) | ({key_column} if key_column else frozenset())
    return CompiledRecipe(programs, accepted, key_column, None)


def compile_recipe(recipe: Recipe, feature_names: Sequence[str], key_column: str | None) -> CompiledRecipe:
    """Compile ``recipe`` for raw rows; ``programs`` is None when it must be replayed instead."""
    accepted = _raw_columns(recipe) | ({key_column} if key_column else frozenset())
    try:
        lineage = _programs(recipe)
        programs = tuple(
            Program(name, lineage[name][0], tuple(lineage[name][1])) for name in feature_names if name in lineage
        )
        if len(programs) != len(feature_names):
            raise NotCompilable
    except (NotCompilable, KeyError, TypeError, ValueError):
        return CompiledRecipe(None, accepted, key_column, recipe)
    return CompiledRecipe(programs, accepted, key_column, recipe)


def _raw_columns(recipe: Recipe) -> frozenset[str]:
    """Every column of the uploads the recipe starts from (what raw rows may name)."""

    def visit(node: Recipe, resolve: Callable[[str], frozenset[str]]) -> frozenset[str]:
        if node.get("source") != "derived":
            return frozenset(node.get("columns", []))
        return frozenset().union(*(resolve(dataset_id) for dataset_id in input_ids(node)))

    return fold_recipe(recipe, visit)


Programs = dict[str, tuple[str, list[Step]]]


def _programs(recipe: Recipe) -> Programs:
    """Each column of the recipe's dataset: (raw column, steps), mirroring ``replay`` step by step.

    Each dataset of the recipe's DAG is compiled once (the fold memoizes), so compiling is linear
    in the recipe's size however often a dataset is reached.
    """

    def visit(node: Recipe, resolve: Callable[[str], Programs]) -> Programs:
        if node.get("source") != "derived":
            return {name: (name, []) for name in node.get("columns", [])}
        table = dict(resolve(node["parent_id"]))
        for record in parse_steps(node["steps"]):  # a step Centroid does not know: InvalidInput
            table = _compile_step(table, record, resolve)
        return table

    return fold_recipe(recipe, visit)


def _compile_step(table: Programs, record: FittedStep, resolve: Callable[[str], Programs]) -> Programs:
    if isinstance(record, FittedJoin):  # as FittedJoin.replay: suffixes, the other join column dropped
        table = {record.left_name(name): program for name, program in table.items()}
        right = {record.right_name(name): program for name, program in resolve(record.dataset_id).items()}
        return {**table, **{name: program for name, program in right.items() if name not in table}}
    if isinstance(record, FittedScale):
        table = dict(table)
        for name, params in record.params.items():
            if name in table:
                step = Step(
                    "scale",
                    method=record.method,
                    params=tuple((key, float(value)) for key, value in params.model_dump().items()),
                    feature_range=tuple(record.feature_range),
                )
                table[name] = (table[name][0], [*table[name][1], step])
        return table
    if isinstance(record, FittedFillNa):
        table = dict(table)
        for name, value in record.values.items():
            if name in table:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise NotCompilable  # a text fill: not a numeric feature's step
                table[name] = (table[name][0], [*table[name][1], Step("fill", value=float(value))])
        return table
    if isinstance(record, FittedSelect):
        return {name: table[name] for name in record.columns if name in table}
    if isinstance(record, FittedDrop):
        return {name: program for name, program in table.items() if name not in record.columns}
    if isinstance(record, FittedRename):
        mapping = record.mapping
        renamed = [mapping.get(name, name) for name in table]
        if len(set(renamed)) != len(renamed):
            raise NotCompilable
        return {mapping.get(name, name): program for name, program in table.items()}
    if isinstance(record, FittedDropNa):
        return table  # a prediction row is never dropped
    raise NotCompilable  # a step without a per-column form: the recipe is replayed instead


def _present_columns(rows: Sequence[Row]) -> set[str]:
    return set().union(*rows) if rows else set()


def check_row_keys(rows: Sequence[Row], accepted: frozenset[str], what: str = "rows") -> None:
    """Refuse keys the model cannot use, before any other work (time proportional to the body)."""
    present = _present_columns(rows)
    unknown = present - accepted
    if unknown:
        # Names are echoed back: a lone surrogate could not be encoded in the response.
        shown = [name.encode("utf-8", "backslashreplace").decode("utf-8") for name in sorted(unknown)[:_UNKNOWN_SHOWN]]
        more = f" and {len(unknown) - len(shown)} more" if len(unknown) > len(shown) else ""
        raise InvalidInput(
            f"{what} name column(s) the model does not use: {', '.join(map(repr, shown))}{more}",
            details={"unknown": shown, "unknown_count": len(unknown), "accepted": sorted(accepted)},
        )


def numeric_column(name: str, rows: Sequence[Row]) -> np.ndarray:
    """One column of the rows as float64, null → NaN; the upload parser's rules for anything else.

    Plain JSON numbers (the common case) are converted by numpy in one call. Text cells (numbers
    with thousands separators, quoted numbers, words) and non-finite numbers go through the
    parser's column typing, so they read, or fail, exactly as they did in an uploaded file.
    """
    cells = [row.get(name) for row in rows]
    if set(map(type, cells)) <= _PLAIN:
        try:
            values = np.array(cells, dtype=np.float64)
        except OverflowError:
            values = None
        if values is not None and int(np.count_nonzero(~np.isfinite(values))) == cells.count(None):
            return values
    return _typed_column(name, cells)


def _typed_column(name: str, cells: list[Any]) -> np.ndarray:
    for row, cell in enumerate(cells):
        if isinstance(cell, str) and not is_unicode_text(cell):
            raise _surrogate(row, name)
    text = pd.Series([None if cell is None else _cell_text(cell) for cell in cells], dtype=object)
    typed = _type_column(name, text, is_key=False)
    if pd.api.types.is_numeric_dtype(typed.dtype) and not pd.api.types.is_bool_dtype(typed.dtype):
        return typed.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = non_numeric_cells(pd.DataFrame({name: typed}), name)
    example = f": row {bad[0]['row']} holds {bad[0]['value']!r}" if bad else ""
    raise InvalidInput(f"rows: column {name!r} is not numeric{example}", details={"column": name, "cells": bad})


def _surrogate(row: int, column: str) -> InvalidInput:
    return InvalidInput(
        f"row {row} column {column!r}: the value is not valid Unicode text (a lone surrogate)",
        details={"row": row, "column": column},
    )


def row_keys(rows: Sequence[Row], key_column: str | None) -> list[str]:
    """Each row's key (the key column's text), or its position when no row carries the key."""
    if not key_column or not any(key_column in row for row in rows):
        return [str(i) for i in range(len(rows))]
    keys: list[str] = []
    for index, row in enumerate(rows):
        cell = row.get(key_column)
        text = cell.strip() if isinstance(cell, str) else None if cell is None else _cell_text(cell).strip()
        if text and not is_unicode_text(text):
            raise _surrogate(index, key_column)
        if not text:
            raise InvalidInput(
                f"row {index} has no value for the key column {key_column!r}; label every row or none",
                details={"row": index, "key_column": key_column},
            )
        keys.append(text)
    return keys
