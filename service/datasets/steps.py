"""Derive steps, one class each: the fitted parameters (a pydantic model) and what the step does.

A derive request names its steps (``schemas.datasets.DeriveStep``); applying one *fits* it on the
dataset (a scaler's min/max, a fill value, a join's resolved join columns) into its fitted form,
which the derived dataset's recipe stores as JSON and every later use reads back:

* :meth:`FittedStepBase.fit` — the request step fitted on a table (pandas; a join also reads the
  other side's key column and column names);
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
key order and ``1`` versus ``1.0`` included (``tests/datasets/test_steps.py`` checks it); a join
that only the newer fields can describe (``left_on`` other than ``right_on``, ``suffixes``) stores
its newer form (see :class:`FittedJoin`).
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
    SerializerFunctionWrapHandler,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_serializer,
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
    def fit(cls, table: Table, step: Any, load: TableLoader) -> Self:
        """The request ``step`` fitted on ``table`` (which it does not change); ``load`` gives a joined
        dataset's table (a join resolves its join columns against both sides)."""

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
    """``join``: the other dataset by reference (its id), the join columns, resolved, and the suffixes.

    Stored as ``{"op", "dataset_id", "how", "on"}`` when both join columns have one name and no
    ``suffixes`` were asked for (the form recipes have always stored, and still read); otherwise as
    ``{"op", "dataset_id", "how", "left_on", "right_on", "suffixes", "suffixed"}``, where
    ``suffixed`` lists the columns both sides had (besides the join columns), which took the
    suffixes: a replay renames exactly these, whatever columns the raw rows carry.
    """

    op: Literal["join"] = "join"
    dataset_id: str
    how: Literal["inner", "left"]
    left_on: str
    right_on: str
    suffixes: tuple[str, str] | None = None
    suffixed: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _stored_on(cls, data: Any) -> Any:
        """The form stored by every version: ``on`` names both join columns."""
        if isinstance(data, Mapping) and "on" in data:
            if "left_on" in data or "right_on" in data:
                raise ValueError("a join names `on`, or `left_on` and `right_on`, not both")
            rest = {key: value for key, value in data.items() if key != "on"}
            return {**rest, "left_on": data["on"], "right_on": data["on"]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.suffixes is None and self.suffixed:
            raise ValueError("suffixed columns need suffixes")
        return self

    @model_serializer(mode="wrap")
    def _stored_form(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        if self.left_on == self.right_on and self.suffixes is None:
            return {"op": self.op, "dataset_id": self.dataset_id, "how": self.how, "on": self.left_on}
        stored: dict[str, Any] = handler(self)
        return stored

    @classmethod
    def resolve(
        cls,
        step: JoinStep,
        left_key: str | None,
        left_columns: Sequence[str],
        right_key: str | None,
        right_columns: Sequence[str],
    ) -> Self:
        """The request resolved against both sides' key column and column names, or InvalidInput.

        Checks everything names decide (both implementations call it, so they refuse alike):
        which fields are given, the join columns' presence, and the names both sides have."""
        given = [name for name in ("on", "left_on", "right_on") if getattr(step, name) is not None]
        if step.on is not None and len(given) > 1:
            raise InvalidInput(
                "join takes `on` (one name on both sides) or `left_on` and `right_on`, not both",
                details={"fields": given},
            )
        left_on = step.on if step.on is not None else step.left_on if step.left_on is not None else left_key
        if left_on is None:
            wanted = "`left_on`" if step.right_on is not None else "`on` (or `left_on` and `right_on`)"
            raise InvalidInput(f"join needs {wanted} because this dataset has no key column")
        right_on = step.on if step.on is not None else step.right_on if step.right_on is not None else right_key
        other = f"dataset {step.dataset_id}"
        if right_on is None:  # the other side has no key column: its column of the same name, as always
            if left_on not in right_columns:
                raise InvalidInput(
                    f"join column {left_on!r} is missing from {other}, which has no key column either: pass "
                    "`right_on` to name its join column",
                    details={"on": left_on},
                )
            right_on = left_on
        for name, columns, side in ((left_on, left_columns, "this dataset"), (right_on, right_columns, other)):
            if name not in columns:
                raise InvalidInput(f"join column {name!r} is missing from {side}", details={"on": name})
        # The other side's join column is not carried over; this side's keeps its name.
        shared = sorted(set(left_columns) & {name for name in right_columns if name != right_on})
        if shared and step.suffixes is None:
            raise InvalidInput(
                f"both datasets have column(s) {', '.join(map(repr, shared))}; pass `suffixes` (e.g. "
                '["_x", "_y"]) to keep both, or rename or drop them first',
                details={"columns": shared},
            )
        fitted = cls(
            dataset_id=step.dataset_id,
            how=step.how,
            left_on=left_on,
            right_on=right_on,
            suffixes=step.suffixes,
            suffixed=tuple(shared),
        )
        if shared:
            left_result = [fitted.left_name(name) for name in left_columns]
            right_result = [fitted.right_name(name) for name in right_columns if name != right_on]
            result = [*left_result, *right_result]
            twice = sorted({name for name in result if result.count(name) > 1})
            if twice:
                left_suffix, right_suffix = fitted.suffixes or ("", "")
                raise InvalidInput(
                    f"join: the suffixes {left_suffix!r} and {right_suffix!r} leave column(s) "
                    f"{', '.join(map(repr, twice))} twice; choose suffixes that keep every name unique",
                    details={"columns": twice, "suffixes": [left_suffix, right_suffix]},
                )
            check_column_names(result)
        return fitted

    def left_name(self, name: str) -> str:
        """A column of this side as the result names it (only a suffixed name changes)."""
        if self.suffixes is None or name == self.left_on or name not in self.suffixed:
            return name
        return name + self.suffixes[0]

    def right_name(self, name: str) -> str:
        """A column of the other side as the result names it; its join column stands for this side's."""
        if name == self.right_on:
            return self.left_on
        if self.suffixes is None or name not in self.suffixed:
            return name
        return name + self.suffixes[1]

    def key_column(self, left_key: str | None) -> str:
        """The result's key column: this side's (as renamed), else the join column."""
        return self.left_name(left_key) if left_key is not None else self.left_on

    @classmethod
    def fit(cls, table: Table, step: JoinStep, load: TableLoader) -> Self:
        right = load(step.dataset_id)
        return cls.resolve(
            step, table.key_column, list(table.frame.columns), right.key_column, list(right.frame.columns)
        )

    def apply(self, table: Table, load: TableLoader) -> Table:
        left, right = table, load(self.dataset_id)
        for name, each, side in (
            (self.left_on, left, "this dataset"),
            (self.right_on, right, f"dataset {self.dataset_id}"),
        ):
            duplicated = each.frame[name][each.frame[name].duplicated()].unique().tolist()
            if duplicated:
                raise InvalidInput(
                    f"join column {name!r} has duplicate values in {side}: {', '.join(map(str, duplicated[:10]))}",
                    details={"on": name, "duplicates": [str(v) for v in duplicated[:100]]},
                )
        on = self.left_on
        left_frame = left.frame.rename(columns=self.left_name)
        right_frame = right.frame.rename(columns=self.right_name)
        merged = left_frame.assign(**{on: left_frame[on].astype("string")}).merge(
            right_frame.assign(**{on: right_frame[on].astype("string")}), on=on, how=self.how, sort=False
        )
        return Table(merged.reset_index(drop=True), self.key_column(left.key_column))

    def replay(self, table: Table, resolve: Frames) -> Table:
        """The other side replayed on the same raw rows; its columns are added alongside (suffixed as
        in the dataset; its join column only when the rows lack this side's)."""
        left = table.frame.rename(columns=self.left_name)
        right = resolve(self.dataset_id).rename(columns=self.right_name)
        extra = [c for c in right.columns if c not in left.columns]
        return Table(pd.concat([left, right[extra]], axis=1), None)

    def lineage(self, columns: dict[str, Lineage], resolve: Lineages) -> dict[str, Lineage]:
        right = {self.right_name(name): value for name, value in resolve(self.dataset_id).items()}
        return {**right, **{self.left_name(name): value for name, value in columns.items()}}


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
    def fit(cls, table: Table, step: ScaleStep, load: TableLoader) -> Self:
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
    def fit(cls, table: Table, step: SelectStep, load: TableLoader) -> Self:
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
    def fit(cls, table: Table, step: DropStep, load: TableLoader) -> Self:
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
    def fit(cls, table: Table, step: RenameStep, load: TableLoader) -> Self:
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
    def fit(cls, table: Table, step: DropNaStep, load: TableLoader) -> Self:
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
    def fit(cls, table: Table, step: FillNaStep, load: TableLoader) -> Self:
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


def fit_step(table: Table, step: DeriveStep, load: TableLoader) -> FittedStep:
    """A derive request's step fitted on ``table``, by the class its ``op`` names (``load`` gives a
    joined dataset's table)."""
    fitted = STEP_CLASSES[step.op].fit(table, step, load)
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
