"""Derive steps, one class each: the fitted parameters (a pydantic model) and what the step does.

A derive request names its steps (``schemas.datasets.DeriveStep``); applying one *fits* it on the
dataset (a scaler's min/max, a fill value, a join's resolved ``on``) into its fitted form, which the
derived dataset's recipe stores as JSON and every later use reads back:

* :meth:`FittedStepBase.fit` — the request step fitted on a table (pandas);
* :meth:`FittedStepBase.apply` — the fitted step applied to a dataset's table (what a derive does);
* :meth:`FittedStepBase.replay` — the same on raw rows that arrive later (a prediction request):
  rows are never dropped or joined, columns the rows do not carry are passed over;
* :meth:`FittedStepBase.lineage` — where each column comes from, and the scalings on the way
  (centroids back in original units).

:data:`FittedStep` is the discriminated union of the fitted models on ``op``, :data:`STEP_CLASSES`
the registry from ``op`` to class: adding a step is one class here, listed in the union (the
DuckDB twin in :mod:`service.datasets.columnar` and the per-column compiler in
:mod:`service.datasets.online` handle the steps they know; the compiler replays any other).
:func:`parse_step` reads a stored step; a step this code does not know, or a malformed one, is an
:class:`~service.errors.InvalidInput` naming it, never skipped.

Each model dumps (``model_dump(mode="json")``) to exactly the JSON the recipes have always stored,
key order and ``1`` versus ``1.0`` included (``tests/datasets/test_steps.py`` checks it).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Literal, Self, get_args

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from schemas.datasets import DeriveStep, DropNaStep, DropStep, FillNaStep, JoinStep, RenameStep, ScaleStep, SelectStep
from service.datasets.parsing import check_column_names, non_numeric_cells
from service.errors import InvalidInput


@dataclass(frozen=True)
class Table:
    """A dataset's rows with its key column."""

    frame: pd.DataFrame
    key_column: str | None


TableLoader = Callable[[str], Table]


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


# --- fitted parameters ---------------------------------------------------------------------------


class _Stored(BaseModel):
    """A part of a stored recipe: immutable, and no field this code does not know."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class MinMaxParams(_Stored):
    """A column's fitted min-max scaling: its smallest and largest values."""

    min: float
    max: float


class StandardParams(_Stored):
    """A column's fitted standard scaling: its mean and (population) standard deviation."""

    mean: float
    std: float


ColumnScale = MinMaxParams | StandardParams
FillValue = StrictInt | StrictFloat | StrictStr  # an int stays an int: ``0`` is stored as ``0``, not ``0.0``


def minmax_params(name: str, low: float, high: float) -> MinMaxParams:
    """A column's fitted min-max parameters; a constant column is refused (it would divide by zero)."""
    if low == high:
        raise InvalidInput(
            f"scale: column {name!r} is constant ({low}); min-max scaling would divide by zero",
            details={"column": name, "value": low},
        )
    return MinMaxParams(min=low, max=high)


def standard_params(name: str, mean: float, std: float) -> StandardParams:
    """A column's fitted standard-scaling parameters; a zero standard deviation is refused."""
    if std == 0.0:
        raise InvalidInput(
            f"scale: column {name!r} is constant; its standard deviation is zero",
            details={"column": name, "value": mean},
        )
    return StandardParams(mean=mean, std=std)


def _plain(params: ColumnScale | Mapping[str, float]) -> Mapping[str, float]:
    return params if isinstance(params, Mapping) else params.model_dump()


def scale_values(
    values: np.ndarray, method: str, params: ColumnScale | Mapping[str, float], feature_range: Sequence[float]
) -> np.ndarray:
    """The scaling formula itself, shared by datasets and by replays on raw rows."""
    params = _plain(params)
    if method == "minmax":
        low, high = feature_range
        return low + (values - params["min"]) * (high - low) / (params["max"] - params["min"])
    return (values - params["mean"]) / params["std"]


def unscale_values(
    values: np.ndarray, method: str, params: ColumnScale | Mapping[str, float], feature_range: Sequence[float]
) -> np.ndarray:
    """Inverse of :func:`scale_values` (centroids back in original units)."""
    params = _plain(params)
    if method == "minmax":
        low, high = feature_range
        return params["min"] + (values - low) * (params["max"] - params["min"]) / (high - low)
    return values * params["std"] + params["mean"]


def _fits_a_float(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _describe_integer(value: int) -> str:
    """A huge integer for an error message: its size, not its digits (``str`` refuses > 4300 digits)."""
    return f"an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"


@dataclass(frozen=True)
class Lineage:
    """Where a column came from: its raw name and the scalings applied to it, in order (each one
    a ``scale`` step fitted for that column alone)."""

    raw_name: str
    scalings: tuple[FittedScale, ...] = ()


Frames = Callable[[str], pd.DataFrame]  # a dataset id -> the replay of that input on the raw rows
Lineages = Callable[[str], dict[str, Lineage]]  # a dataset id -> the lineage of that input's columns


class FittedStepBase(_Stored):
    """A fitted derive step: its parameters (the fields) and what it does (the methods)."""

    @classmethod
    @abstractmethod
    def fit(cls, table: Table, step: Any) -> Self:
        """The request ``step`` fitted on ``table`` (which it does not change)."""

    @abstractmethod
    def apply(self, table: Table, load: TableLoader) -> Table:
        """The step applied to a dataset's table; ``load`` gives a joined dataset's table."""

    @abstractmethod
    def replay(self, table: Table, resolve: Frames) -> Table:
        """The step on raw rows (no key column): no row dropped or joined, absent columns passed over."""

    @abstractmethod
    def lineage(self, columns: dict[str, Lineage], resolve: Lineages) -> dict[str, Lineage]:
        """Each column's lineage after the step, from each column's lineage before it."""


class FittedJoin(FittedStepBase):
    """``join``: the other dataset by reference (its id) and the join column, resolved."""

    op: Literal["join"] = "join"
    dataset_id: str
    how: Literal["inner", "left"]
    on: str

    @classmethod
    def of(cls, step: JoinStep, on: str) -> Self:
        return cls(dataset_id=step.dataset_id, how=step.how, on=on)

    @classmethod
    def fit(cls, table: Table, step: JoinStep) -> Self:
        on = step.on or table.key_column
        if on is None:
            raise InvalidInput("join needs `on` because this dataset has no key column")
        return cls.of(step, on)

    def apply(self, table: Table, load: TableLoader) -> Table:
        left, on = table, self.on
        right = load(self.dataset_id)
        for side, each in (("this dataset", left), (f"dataset {self.dataset_id}", right)):
            if on not in each.frame.columns:
                raise InvalidInput(f"join column {on!r} is missing from {side}", details={"on": on})
            duplicated = each.frame[on][each.frame[on].duplicated()].unique().tolist()
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
            right.frame.assign(**{on: right.frame[on].astype("string")}), on=on, how=self.how, sort=False
        )
        return Table(merged.reset_index(drop=True), left.key_column or on)

    def replay(self, table: Table, resolve: Frames) -> Table:
        """The other side replayed on the same raw rows; its columns are added alongside."""
        right = resolve(self.dataset_id)
        extra = [c for c in right.columns if c not in table.frame.columns]
        return Table(pd.concat([table.frame, right[extra]], axis=1), None)

    def lineage(self, columns: dict[str, Lineage], resolve: Lineages) -> dict[str, Lineage]:
        return {**resolve(self.dataset_id), **columns}


class FittedScale(FittedStepBase):
    """``scale``: the request's fields plus ``params``, each column's fitted min/max or mean/std."""

    op: Literal["scale"] = "scale"
    columns: list[str]
    method: Literal["minmax", "standard"]
    feature_range: tuple[float, float]
    params: dict[str, ColumnScale]

    @model_validator(mode="after")
    def _params_of_the_method(self) -> Self:
        kind = MinMaxParams if self.method == "minmax" else StandardParams
        wrong = [name for name, params in self.params.items() if not isinstance(params, kind)]
        if wrong:
            raise ValueError(f"{self.method} scaling needs {' and '.join(kind.model_fields)} for {wrong[0]!r}")
        return self

    @classmethod
    def of(cls, step: ScaleStep, params: Mapping[str, ColumnScale]) -> Self:
        return cls(
            columns=list(step.columns), method=step.method, feature_range=step.feature_range, params=dict(params)
        )

    @classmethod
    def fit(cls, table: Table, step: ScaleStep) -> Self:
        require_numeric(table, step.columns, "scale")
        params: dict[str, ColumnScale] = {}
        for name in step.columns:
            values = table.frame[name].dropna().to_numpy(dtype="float64")
            if values.size == 0:
                raise InvalidInput(f"scale: column {name!r} has no values", details={"column": name})
            if step.method == "minmax":
                params[name] = minmax_params(name, float(values.min()), float(values.max()))
            else:
                params[name] = standard_params(name, float(values.mean()), float(values.std(ddof=0)))
        return cls.of(step, params)

    def apply(self, table: Table, load: TableLoader) -> Table:
        return self._scaled(table, self.params)

    def replay(self, table: Table, resolve: Frames) -> Table:
        return self._scaled(table, {name: p for name, p in self.params.items() if name in table.frame.columns})

    def _scaled(self, table: Table, params: Mapping[str, ColumnScale]) -> Table:
        frame = table.frame.copy()
        for name, column_params in params.items():
            require_numeric(table, [name], "scale")
            values = frame[name].to_numpy(dtype="float64", na_value=np.nan)
            frame[name] = scale_values(values, self.method, column_params, self.feature_range)
        return Table(frame, table.key_column)

    def lineage(self, columns: dict[str, Lineage], resolve: Lineages) -> dict[str, Lineage]:
        columns = dict(columns)
        for name, params in self.params.items():
            single = self.model_copy(update={"params": {name: params}})
            columns[name] = Lineage(columns[name].raw_name, (*columns[name].scalings, single))
        return columns


class FittedSelect(FittedStepBase):
    """``select``: the columns kept, in order (a name repeated in the request is stored once)."""

    op: Literal["select"] = "select"
    columns: list[str]

    @classmethod
    def of(cls, step: SelectStep) -> Self:
        return cls(columns=list(dict.fromkeys(step.columns)))

    @classmethod
    def fit(cls, table: Table, step: SelectStep) -> Self:
        return cls.of(step)

    def apply(self, table: Table, load: TableLoader) -> Table:
        columns = list(dict.fromkeys(self.columns))
        require_columns(table, columns, "select")
        if table.key_column and table.key_column not in columns:
            columns.insert(0, table.key_column)
        return Table(table.frame[columns], table.key_column)

    def replay(self, table: Table, resolve: Frames) -> Table:
        frame = table.frame
        return Table(frame[[c for c in self.columns if c in frame.columns]], None)

    def lineage(self, columns: dict[str, Lineage], resolve: Lineages) -> dict[str, Lineage]:
        return {name: columns[name] for name in columns if name in self.columns}


class FittedDrop(FittedStepBase):
    """``drop``: the columns removed (a name repeated in the request is stored once)."""

    op: Literal["drop"] = "drop"
    columns: list[str]

    @classmethod
    def of(cls, step: DropStep) -> Self:
        return cls(columns=list(dict.fromkeys(step.columns)))

    @classmethod
    def fit(cls, table: Table, step: DropStep) -> Self:
        return cls.of(step)

    def apply(self, table: Table, load: TableLoader) -> Table:
        require_columns(table, self.columns, "drop")
        key = None if table.key_column in self.columns else table.key_column
        return Table(table.frame.drop(columns=self.columns), key)

    def replay(self, table: Table, resolve: Frames) -> Table:
        frame = table.frame
        return Table(frame.drop(columns=[c for c in self.columns if c in frame.columns]), None)

    def lineage(self, columns: dict[str, Lineage], resolve: Lineages) -> dict[str, Lineage]:
        return {name: value for name, value in columns.items() if name not in self.columns}


class FittedRename(FittedStepBase):
    """``rename``: old name -> new name."""

    op: Literal["rename"] = "rename"
    mapping: dict[str, str]

    @classmethod
    def of(cls, step: RenameStep) -> Self:
        return cls(mapping=dict(step.mapping))

    @classmethod
    def fit(cls, table: Table, step: RenameStep) -> Self:
        return cls.of(step)

    def apply(self, table: Table, load: TableLoader) -> Table:
        mapping = self.mapping
        require_columns(table, list(mapping), "rename")
        check_column_names(list(mapping.values()))
        renamed = [mapping.get(name, name) for name in table.frame.columns]
        clashes = sorted({name for name in renamed if renamed.count(name) > 1})
        if clashes:
            raise InvalidInput(f"rename: would create duplicate column(s) {clashes}", details={"columns": clashes})
        key = mapping.get(table.key_column, table.key_column) if table.key_column else None
        return Table(table.frame.rename(columns=mapping), key)

    def replay(self, table: Table, resolve: Frames) -> Table:
        return Table(table.frame.rename(columns=self.mapping), None)

    def lineage(self, columns: dict[str, Lineage], resolve: Lineages) -> dict[str, Lineage]:
        return {self.mapping.get(name, name): value for name, value in columns.items()}


class FittedDropNa(FittedStepBase):
    """``dropna``: rows with a null in ``columns`` (null: any column) are dropped from the dataset."""

    op: Literal["dropna"] = "dropna"
    columns: list[str] | None

    @classmethod
    def of(cls, step: DropNaStep) -> Self:
        return cls(columns=step.columns)

    @classmethod
    def fit(cls, table: Table, step: DropNaStep) -> Self:
        return cls.of(step)

    def apply(self, table: Table, load: TableLoader) -> Table:
        if self.columns:
            require_columns(table, self.columns, "dropna")
        return Table(table.frame.dropna(subset=self.columns).reset_index(drop=True), table.key_column)

    def replay(self, table: Table, resolve: Frames) -> Table:
        return table  # a prediction row is never dropped

    def lineage(self, columns: dict[str, Lineage], resolve: Lineages) -> dict[str, Lineage]:
        return columns


class FittedFillNa(FittedStepBase):
    """``fillna``: the value each column's nulls are filled with (its mean, or the constant)."""

    op: Literal["fillna"] = "fillna"
    values: dict[str, FillValue]

    @classmethod
    def fit(cls, table: Table, step: FillNaStep) -> Self:
        columns = step.columns or [
            c for c in table.frame.columns if c != table.key_column and table.frame[c].isna().any()
        ]
        require_columns(table, columns, "fillna")
        if step.strategy == "constant" and step.value is None:
            raise InvalidInput("fillna: `value` is required with strategy `constant`")
        if step.strategy == "constant" and isinstance(step.value, int) and not _fits_a_float(step.value):
            raise InvalidInput(
                f"fillna: `value` ({_describe_integer(step.value)}) is beyond the range of a 64-bit float "
                "(about 1.8e308)",
                details={"field": "value", "limit": "1.7976931348623157e308"},
            )
        values: dict[str, FillValue] = {}
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
            elif step.value is not None:
                values[name] = step.value
        return cls(values=values)

    def apply(self, table: Table, load: TableLoader) -> Table:
        frame = table.frame.copy()
        for name, value in self.values.items():
            if name in frame.columns:
                column = frame[name]
                frame[name] = (column.astype("float64") if is_numeric(column) else column).fillna(value)
        return Table(frame, table.key_column)

    def replay(self, table: Table, resolve: Frames) -> Table:
        return self.apply(table, _no_load)

    def lineage(self, columns: dict[str, Lineage], resolve: Lineages) -> dict[str, Lineage]:
        return columns


def _no_load(dataset_id: str) -> Table:
    raise AssertionError(f"fillna loads no dataset ({dataset_id})")


FittedStep = Annotated[
    FittedJoin | FittedScale | FittedSelect | FittedDrop | FittedRename | FittedDropNa | FittedFillNa,
    Field(discriminator="op"),
]
"""A fitted step as the recipes store it, told apart by ``op``."""

#: ``op`` -> the class of that step (every member of :data:`FittedStep`).
STEP_CLASSES: Mapping[str, type[FittedStepBase]] = MappingProxyType(
    {member.model_fields["op"].default: member for member in get_args(get_args(FittedStep)[0])}
)

_FITTED_STEP: TypeAdapter[FittedStep] = TypeAdapter(FittedStep)


def fit_step(table: Table, step: DeriveStep) -> FittedStep:
    """A derive request's step fitted on ``table``, by the class its ``op`` names."""
    fitted = STEP_CLASSES[step.op].fit(table, step)
    return _FITTED_STEP.validate_python(fitted)  # the instance itself, typed as the union


def parse_step(record: FittedStepBase | Mapping[str, Any]) -> FittedStep:
    """A recipe's stored step (JSON) as its fitted model; InvalidInput for an unknown or malformed step."""
    if isinstance(record, FittedStepBase):
        return _FITTED_STEP.validate_python(record)
    op = record.get("op") if isinstance(record, Mapping) else None
    if not isinstance(op, str) or op not in STEP_CLASSES:
        raise InvalidInput(
            f"the recipe has a step {op!r} that Centroid does not know (known steps: {', '.join(STEP_CLASSES)}); "
            "it cannot be replayed",
            details={"op": op if isinstance(op, str) else repr(op), "known": list(STEP_CLASSES)},
        )
    try:
        return _FITTED_STEP.validate_python(record)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        first = errors[0]
        field = ".".join(map(str, first["loc"][1:]))  # the first part of a location is the op
        raise InvalidInput(
            f"the recipe's {op!r} step is malformed: {f'{field}: ' if field else ''}{first['msg']}",
            details={"op": op, "errors": [{"loc": list(e["loc"][1:]), "msg": e["msg"]} for e in errors]},
        ) from None


def parse_steps(records: Iterable[FittedStepBase | Mapping[str, Any]]) -> list[FittedStep]:
    return [parse_step(record) for record in records]
