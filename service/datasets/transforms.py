"""Derive steps on tables (pandas), and their replay on new raw rows.

Applying a step *fits* it (a scaler's min/max, a fill value) and returns the fitted form, which the
new dataset's recipe keeps. :func:`replay` applies a recipe's fitted steps to raw rows that
arrive later (a prediction request), so they are transformed exactly like the training data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from schemas.datasets import (
    DeriveStep,
    DropNaStep,
    FillNaStep,
    JoinStep,
    ScaleStep,
)
from service.datasets.parsing import check_column_names, check_key, non_numeric_cells
from service.errors import InvalidInput

Recipe = dict[str, Any]
FittedStep = dict[str, Any]


@dataclass(frozen=True)
class Table:
    """A dataset's rows with its key column."""

    frame: pd.DataFrame
    key_column: str | None


TableLoader = Callable[[str], tuple[Table, Recipe]]


def is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype)


def require_columns(table: Table, columns: Sequence[str], purpose: str) -> None:
    missing = [name for name in columns if name not in table.frame.columns]
    if missing:
        raise InvalidInput(
            f"{purpose}: unknown column(s) {', '.join(map(repr, missing))}",
            details={"missing": missing, "columns": list(table.frame.columns)},
        )


def require_numeric(table: Table, columns: Sequence[str], purpose: str) -> None:
    """Columns used as numbers must be numeric; name the first offending cells otherwise."""
    require_columns(table, columns, purpose)
    for name in columns:
        if name == table.key_column:
            raise InvalidInput(f"{purpose}: {name!r} is the key column, not a feature", details={"column": name})
        if not is_numeric(table.frame[name]):
            bad = non_numeric_cells(table.frame, name)
            example = f": row {bad[0]['row']} holds {bad[0]['value']!r}" if bad else ""
            raise InvalidInput(
                f"{purpose}: column {name!r} is not numeric{example}", details={"column": name, "cells": bad}
            )


def apply_steps(table: Table, steps: Sequence[DeriveStep], load: TableLoader) -> tuple[Table, list[FittedStep]]:
    """Apply steps in order; return the result and each step's fitted form."""
    fitted: list[FittedStep] = []
    for index, step in enumerate(steps):
        try:
            table, record = _apply(table, step, load)
        except InvalidInput as exc:
            exc.message = f"step {index} ({step.op}): {exc.message}"
            raise
        fitted.append(record)
    if table.frame.empty or table.frame.shape[1] == 0:
        raise InvalidInput("the steps leave no rows or no columns", details={"shape": list(table.frame.shape)})
    return table, fitted


def _apply(table: Table, step: DeriveStep, load: TableLoader) -> tuple[Table, FittedStep]:
    if isinstance(step, JoinStep):
        return _join(table, step, load)
    if isinstance(step, ScaleStep):
        params = fit_scale(table, step)
        record = {**step.model_dump(mode="json"), "params": params}
        return apply_scale(table, record), record
    if isinstance(step, FillNaStep):
        record = {"op": "fillna", "values": _fit_fill(table, step)}
        return apply_fill(table, record), record
    record = step.model_dump(mode="json")
    if isinstance(step, DropNaStep):
        return _dropna(table, step), record
    return apply_shape_step(table, record), record


def _join(left: Table, step: JoinStep, load: TableLoader) -> tuple[Table, FittedStep]:
    on = step.on or left.key_column
    if on is None:
        raise InvalidInput("join needs `on` because this dataset has no key column")
    right, right_recipe = load(step.dataset_id)
    for side, table in (("this dataset", left), (f"dataset {step.dataset_id}", right)):
        if on not in table.frame.columns:
            raise InvalidInput(f"join column {on!r} is missing from {side}", details={"on": on})
        duplicated = table.frame[on][table.frame[on].duplicated()].unique().tolist()
        if duplicated:
            raise InvalidInput(
                f"join column {on!r} has duplicate values in {side}: {', '.join(map(str, duplicated[:10]))}",
                details={"on": on, "duplicates": [str(v) for v in duplicated[:100]]},
            )
    shared = sorted((set(left.frame.columns) & set(right.frame.columns)) - {on})
    if shared:
        raise InvalidInput(
            f"both datasets have column(s) {', '.join(map(repr, shared))}; rename or drop them first",
            details={"columns": shared},
        )
    merged = left.frame.assign(**{on: left.frame[on].astype("string")}).merge(
        right.frame.assign(**{on: right.frame[on].astype("string")}), on=on, how=step.how, sort=False
    )
    record = {**step.model_dump(mode="json"), "on": on, "right": right_recipe}
    return Table(merged.reset_index(drop=True), left.key_column or on), record


def fit_scale(table: Table, step: ScaleStep) -> dict[str, dict[str, float]]:
    require_numeric(table, step.columns, "scale")
    params: dict[str, dict[str, float]] = {}
    for name in step.columns:
        values = table.frame[name].dropna().to_numpy(dtype="float64")
        if values.size == 0:
            raise InvalidInput(f"scale: column {name!r} has no values", details={"column": name})
        if step.method == "minmax":
            low, high = float(values.min()), float(values.max())
            if low == high:
                raise InvalidInput(
                    f"scale: column {name!r} is constant ({low}); min-max scaling would divide by zero",
                    details={"column": name, "value": low},
                )
            params[name] = {"min": low, "max": high}
        else:
            mean, std = float(values.mean()), float(values.std(ddof=0))
            if std == 0.0:
                raise InvalidInput(
                    f"scale: column {name!r} is constant; its standard deviation is zero",
                    details={"column": name, "value": mean},
                )
            params[name] = {"mean": mean, "std": std}
    return params


def scale_values(
    values: np.ndarray, method: str, params: dict[str, float], feature_range: Sequence[float]
) -> np.ndarray:
    """The scaling formula itself, shared by datasets and by replays on raw rows."""
    if method == "minmax":
        low, high = feature_range
        return low + (values - params["min"]) * (high - low) / (params["max"] - params["min"])
    return (values - params["mean"]) / params["std"]


def unscale_values(
    values: np.ndarray, method: str, params: dict[str, float], feature_range: Sequence[float]
) -> np.ndarray:
    """Inverse of :func:`scale_values` (centroids back in original units)."""
    if method == "minmax":
        low, high = feature_range
        return params["min"] + (values - low) * (params["max"] - params["min"]) / (high - low)
    return values * params["std"] + params["mean"]


def apply_scale(table: Table, record: FittedStep) -> Table:
    frame = table.frame.copy()
    for name, params in record["params"].items():
        require_numeric(table, [name], "scale")
        values = frame[name].to_numpy(dtype="float64", na_value=np.nan)
        frame[name] = scale_values(values, record["method"], params, record["feature_range"])
    return Table(frame, table.key_column)


def _fit_fill(table: Table, step: FillNaStep) -> dict[str, Any]:
    columns = step.columns or [c for c in table.frame.columns if c != table.key_column and table.frame[c].isna().any()]
    require_columns(table, columns, "fillna")
    if step.strategy == "constant" and step.value is None:
        raise InvalidInput("fillna: `value` is required with strategy `constant`")
    values: dict[str, Any] = {}
    for name in columns:
        numeric = is_numeric(table.frame[name])
        if step.strategy == "mean":
            require_numeric(table, [name], "fillna mean")
            mean = table.frame[name].mean()
            if pd.isna(mean):
                raise InvalidInput(f"fillna: column {name!r} has no values to average", details={"column": name})
            values[name] = float(mean)
        elif numeric != isinstance(step.value, int | float):
            kind = "a number" if numeric else "text"
            raise InvalidInput(f"fillna: column {name!r} needs {kind} as `value`", details={"column": name})
        else:
            values[name] = step.value
    return values


def apply_fill(table: Table, record: FittedStep) -> Table:
    frame = table.frame.copy()
    for name, value in record["values"].items():
        if name in frame.columns:
            column = frame[name]
            frame[name] = (column.astype("float64") if is_numeric(column) else column).fillna(value)
    return Table(frame, table.key_column)


def _dropna(table: Table, step: DropNaStep) -> Table:
    if step.columns:
        require_columns(table, step.columns, "dropna")
    return Table(table.frame.dropna(subset=step.columns).reset_index(drop=True), table.key_column)


def apply_shape_step(table: Table, record: FittedStep) -> Table:
    """``select``, ``drop`` and ``rename``: they change columns, not values."""
    op = record["op"]
    if op == "select":
        columns = list(dict.fromkeys(record["columns"]))
        require_columns(table, columns, "select")
        if table.key_column and table.key_column not in columns:
            columns.insert(0, table.key_column)
        return Table(table.frame[columns], table.key_column)
    if op == "drop":
        require_columns(table, record["columns"], "drop")
        key = None if table.key_column in record["columns"] else table.key_column
        return Table(table.frame.drop(columns=record["columns"]), key)
    if op == "rename":
        mapping: dict[str, str] = record["mapping"]
        require_columns(table, list(mapping), "rename")
        check_column_names(list(mapping.values()))
        renamed = [mapping.get(name, name) for name in table.frame.columns]
        clashes = sorted({name for name in renamed if renamed.count(name) > 1})
        if clashes:
            raise InvalidInput(f"rename: would create duplicate column(s) {clashes}", details={"columns": clashes})
        key = mapping.get(table.key_column, table.key_column) if table.key_column else None
        return Table(table.frame.rename(columns=mapping), key)
    raise InvalidInput(f"unknown step {op!r}")


def replay(recipe: Recipe, raw: pd.DataFrame) -> pd.DataFrame:
    """Transform raw rows the way ``recipe`` transformed its dataset.

    Rows are never dropped or joined here: a join's other side is replayed on the same raw rows
    and its columns are added alongside. Raw rows name the columns of the original uploads.
    """
    if recipe.get("source") != "derived":
        return raw[[c for c in recipe.get("columns", raw.columns) if c in raw.columns]]
    table = Table(replay(recipe["parent"], raw), None)
    for record in recipe["steps"]:
        op = record["op"]
        if op == "join":
            right = replay(record["right"], raw)
            extra = [c for c in right.columns if c not in table.frame.columns]
            table = Table(pd.concat([table.frame, right[extra]], axis=1), None)
        elif op == "scale":
            table = _replay_scale(table, record)
        elif op == "fillna":
            table = apply_fill(table, record)
        elif op in ("select", "drop", "rename"):
            table = _replay_shape(table, record)
    return table.frame


def _replay_scale(table: Table, record: FittedStep) -> Table:
    present = {name: params for name, params in record["params"].items() if name in table.frame.columns}
    return apply_scale(table, {**record, "params": present})


def _replay_shape(table: Table, record: FittedStep) -> Table:
    """Like :func:`apply_shape_step`, but tolerant of columns the raw rows do not carry."""
    frame = table.frame
    if record["op"] == "select":
        return Table(frame[[c for c in record["columns"] if c in frame.columns]], None)
    if record["op"] == "drop":
        return Table(frame.drop(columns=[c for c in record["columns"] if c in frame.columns]), None)
    return Table(frame.rename(columns=record["mapping"]), None)


def ensure_unique_key(table: Table) -> None:
    if table.key_column is not None:
        check_key(table.frame, table.key_column)


@dataclass(frozen=True)
class Lineage:
    """Where a column came from: its raw name and the scalings applied to it, in order."""

    raw_name: str
    scalings: tuple[FittedStep, ...] = ()


def column_lineage(recipe: Recipe) -> dict[str, Lineage]:
    """Each column of a recipe's dataset traced back to an uploaded column."""
    if recipe.get("source") != "derived":
        return {name: Lineage(name) for name in recipe.get("columns", [])}
    lineage = column_lineage(recipe["parent"])
    for record in recipe["steps"]:
        op = record["op"]
        if op == "join":
            lineage = {**column_lineage(record["right"]), **lineage}
        elif op == "scale":
            for name, params in record["params"].items():
                single = {**record, "params": {name: params}}
                lineage[name] = Lineage(lineage[name].raw_name, (*lineage[name].scalings, single))
        elif op == "rename":
            lineage = {record["mapping"].get(name, name): value for name, value in lineage.items()}
        elif op == "select":
            lineage = {name: lineage[name] for name in lineage if name in record["columns"]}
        elif op == "drop":
            lineage = {name: value for name, value in lineage.items() if name not in record["columns"]}
    return lineage


def unscale_column(values: np.ndarray, lineage: Lineage) -> np.ndarray:
    """Undo a column's scalings, last first (centroids back in original units)."""
    for record in reversed(lineage.scalings):
        (params,) = record["params"].values()
        values = unscale_values(values, record["method"], params, record["feature_range"])
    return values
