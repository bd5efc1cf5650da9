"""Derive steps on tables (pandas), and their replay on new raw rows.

Applying a step *fits* it (a scaler's min/max, a fill value) and returns the fitted form, which the
new dataset's recipe keeps. :func:`replay` applies a recipe's fitted steps to raw rows that
arrive later (a prediction request), so they are transformed exactly like the training data.

Recipes name their inputs by reference. A derived dataset's recipe is its own *node* — ``source:
derived``, ``parent_id``, its fitted ``steps`` (a join names the other side's ``dataset_id``) —
plus ``inputs``: the node of every dataset it reads from, directly or through others, keyed by
dataset id and stored **once** however often it is reached. A recipe is therefore a DAG whose
size is linear in the datasets it includes (deriving ``D`` from ``D`` joined with ``D`` sixteen
times adds sixteen nodes, not 2**16 copies), and it is self-contained: it stays usable when the
datasets it names are deleted. Everything that walks a recipe (:func:`replay`,
:func:`column_lineage`, the compiler in :mod:`service.datasets.online`) goes through
:func:`fold_recipe`, which visits each node once per call.

Recipes stored before this form nested the parent's whole recipe as ``parent`` and each join's as
``right``; :func:`recipe_graph` reads them too (migration 0004 rewrites stored ones).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

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


TableLoader = Callable[[str], Table]
T = TypeVar("T")


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
    if record["op"] in ("select", "drop"):
        record["columns"] = list(dict.fromkeys(record["columns"]))  # a name repeated is stored once
    return apply_shape_step(table, record), record


def _join(left: Table, step: JoinStep, load: TableLoader) -> tuple[Table, FittedStep]:
    on = step.on or left.key_column
    if on is None:
        raise InvalidInput("join needs `on` because this dataset has no key column")
    right = load(step.dataset_id)
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
    record = {**step.model_dump(mode="json"), "on": on}  # the other side by reference: its dataset_id
    return Table(merged.reset_index(drop=True), left.key_column or on), record


def fit_scale(table: Table, step: ScaleStep) -> dict[str, dict[str, float]]:
    require_numeric(table, step.columns, "scale")
    params: dict[str, dict[str, float]] = {}
    for name in step.columns:
        values = table.frame[name].dropna().to_numpy(dtype="float64")
        if values.size == 0:
            raise InvalidInput(f"scale: column {name!r} has no values", details={"column": name})
        if step.method == "minmax":
            params[name] = minmax_params(name, float(values.min()), float(values.max()))
        else:
            params[name] = standard_params(name, float(values.mean()), float(values.std(ddof=0)))
    return params


def minmax_params(name: str, low: float, high: float) -> dict[str, float]:
    """A column's fitted min-max parameters; a constant column is refused (it would divide by zero)."""
    if low == high:
        raise InvalidInput(
            f"scale: column {name!r} is constant ({low}); min-max scaling would divide by zero",
            details={"column": name, "value": low},
        )
    return {"min": low, "max": high}


def standard_params(name: str, mean: float, std: float) -> dict[str, float]:
    """A column's fitted standard-scaling parameters; a zero standard deviation is refused."""
    if std == 0.0:
        raise InvalidInput(
            f"scale: column {name!r} is constant; its standard deviation is zero",
            details={"column": name, "value": mean},
        )
    return {"mean": mean, "std": std}


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
    if step.strategy == "constant" and isinstance(step.value, int) and not _fits_a_float(step.value):
        raise InvalidInput(
            f"fillna: `value` ({_describe_integer(step.value)}) is beyond the range of a 64-bit float (about 1.8e308)",
            details={"field": "value", "limit": "1.7976931348623157e308"},
        )
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


def _fits_a_float(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _describe_integer(value: int) -> str:
    """A huge integer for an error message: its size, not its digits (``str`` refuses > 4300 digits)."""
    return f"an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"


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
    and its columns are added alongside. Raw rows name the columns of the original uploads. Each
    dataset of the recipe is replayed once, however many times it is reached.
    """

    def visit(node: Recipe, resolve: Callable[[str], pd.DataFrame]) -> pd.DataFrame:
        if node.get("source") != "derived":
            return raw[[c for c in node.get("columns", raw.columns) if c in raw.columns]]
        table = Table(resolve(node["parent_id"]), None)
        for record in node["steps"]:
            op = record["op"]
            if op == "join":
                right = resolve(record["dataset_id"])
                extra = [c for c in right.columns if c not in table.frame.columns]
                table = Table(pd.concat([table.frame, right[extra]], axis=1), None)
            elif op == "scale":
                table = _replay_scale(table, record)
            elif op == "fillna":
                table = apply_fill(table, record)
            elif op in ("select", "drop", "rename"):
                table = _replay_shape(table, record)
        return table.frame

    return fold_recipe(recipe, visit)


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

    def visit(node: Recipe, resolve: Callable[[str], dict[str, Lineage]]) -> dict[str, Lineage]:
        if node.get("source") != "derived":
            return {name: Lineage(name) for name in node.get("columns", [])}
        lineage = dict(resolve(node["parent_id"]))
        for record in node["steps"]:
            op = record["op"]
            if op == "join":
                lineage = {**resolve(record["dataset_id"]), **lineage}
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

    return fold_recipe(recipe, visit)


def unscale_column(values: np.ndarray, lineage: Lineage) -> np.ndarray:
    """Undo a column's scalings, last first (centroids back in original units)."""
    for record in reversed(lineage.scalings):
        (params,) = record["params"].values()
        values = unscale_values(values, record["method"], params, record["feature_range"])
    return values


# --- recipes as DAGs of datasets, by reference ---------------------------------------------------


class RecipeError(ValueError):
    """A stored recipe names an input it does not include, or reaches itself (never made by Centroid)."""


@dataclass(frozen=True)
class RecipeGraph:
    """A recipe as its own node plus the nodes of every dataset it reads from, each once, by id."""

    root: Recipe
    nodes: Mapping[str, Recipe]


@dataclass(frozen=True)
class RecipeSize:
    depth: int  # longest chain of derives down to an upload (an upload is 0)
    datasets: int  # distinct datasets, the recipe's own included
    steps: int  # steps over all of them
    bytes: int  # the stored recipe's JSON


@dataclass(frozen=True)
class RecipeLimits:
    """The recipe ceilings (``CENTROID_MAX_RECIPE_*``); a derive above one gets 400."""

    max_depth: int = 32
    max_datasets: int = 256
    max_steps: int = 1_000
    max_bytes: int = 8 * 1024 * 1024


def is_derived(recipe: Recipe) -> bool:
    return recipe.get("source") == "derived"


def input_ids(node: Recipe) -> list[str]:
    """The datasets one node reads directly: its parent, then each join's other side (each once)."""
    if not is_derived(node):
        return []
    ids = [node["parent_id"], *(record["dataset_id"] for record in node["steps"] if record["op"] == "join")]
    return list(dict.fromkeys(ids))


def recipe_graph(recipe: Recipe) -> RecipeGraph:
    """The recipe's node and its inputs; reads the by-reference form and the older nested one."""
    if not is_derived(recipe):
        return RecipeGraph(recipe, {})
    if "parent" not in recipe:
        root = {key: value for key, value in recipe.items() if key != "inputs"}
        return RecipeGraph(root, recipe.get("inputs") or {})
    nodes: dict[str, Recipe] = {}
    return RecipeGraph(_unnest(recipe, nodes), nodes)


def _unnest(recipe: Recipe, nodes: dict[str, Recipe]) -> Recipe:
    """A nested (pre-0004) recipe's node, registering every nested recipe once under its dataset id.

    A dataset reached twice is walked once (its id is seen first), so even a recipe that doubled
    at each level costs time linear in the distinct datasets, beyond parsing its JSON.
    """
    if not is_derived(recipe):
        return recipe
    if "parent" not in recipe:  # already by reference (not expected inside a nested recipe)
        nodes.update(recipe.get("inputs") or {})
        return {key: value for key, value in recipe.items() if key != "inputs"}

    def reference(inner: Recipe, dataset_id: str | None) -> str:
        node_id = dataset_id or _content_id(inner)
        if node_id not in nodes:
            nodes[node_id] = _unnest(inner, nodes)
        return node_id

    node = {key: value for key, value in recipe.items() if key != "parent"}
    node["parent_id"] = reference(recipe["parent"], recipe.get("parent_id"))
    steps = []
    for record in recipe["steps"]:
        if record.get("op") == "join" and "right" in record:
            right_id = reference(record["right"], record.get("dataset_id"))
            record = {**{key: value for key, value in record.items() if key != "right"}, "dataset_id": right_id}
        steps.append(record)
    node["steps"] = steps
    return node


def _content_id(recipe: Recipe) -> str:
    """A stable id for a nested recipe that carries none (hand-made ones; Centroid always named them)."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"~{digest[:24]}"


def fold_recipe(recipe: Recipe, visit: Callable[[Recipe, Callable[[str], T]], T]) -> T:
    """``visit(node, resolve)`` on the recipe's own node, where ``resolve(dataset_id)`` is the visit
    of that input: each node is visited once per call (memoized), so the work is linear in the DAG."""
    graph = recipe_graph(recipe)
    done: dict[str, T] = {}
    active: set[str] = set()

    def resolve(dataset_id: str) -> T:
        if dataset_id in done:
            return done[dataset_id]
        node = graph.nodes.get(dataset_id)
        if node is None or dataset_id in active:
            why = "reaches itself" if node is not None else "does not include it"
            raise RecipeError(f"the recipe names dataset {dataset_id!r} but {why}")
        active.add(dataset_id)
        done[dataset_id] = visit(node, resolve)
        active.discard(dataset_id)
        return done[dataset_id]

    return visit(graph.root, resolve)


def derived_recipe(parent_id: str, steps: Sequence[FittedStep], inputs: Mapping[str, Recipe]) -> Recipe:
    """A derived dataset's recipe: its node (``parent_id``, ``steps``) and ``inputs``, the node of
    every dataset it reads from, each once. ``inputs`` maps each dataset the steps read directly
    (the parent and each join's other side) to that dataset's own stored recipe."""
    nodes: dict[str, Recipe] = {}
    for dataset_id, recipe in inputs.items():
        graph = recipe_graph(recipe)
        for node_id, node in graph.nodes.items():
            nodes.setdefault(node_id, node)
        nodes.setdefault(dataset_id, graph.root)
    return {"source": "derived", "parent_id": parent_id, "steps": list(steps), "inputs": nodes}


def recipe_size(recipe: Recipe) -> RecipeSize:
    """Depth, distinct datasets, steps and JSON bytes of a recipe (linear in its size)."""
    graph = recipe_graph(recipe)

    def depth(node: Recipe, resolve: Callable[[str], int]) -> int:
        return 1 + max(resolve(dataset_id) for dataset_id in input_ids(node)) if is_derived(node) else 0

    nodes = [graph.root, *graph.nodes.values()]
    return RecipeSize(
        depth=fold_recipe(recipe, depth),
        datasets=len(nodes),
        steps=sum(len(node.get("steps", ())) for node in nodes if is_derived(node)),
        bytes=len(json.dumps(recipe, separators=(",", ":"), ensure_ascii=False).encode()),
    )


def check_recipe(recipe: Recipe, limits: RecipeLimits) -> RecipeSize:
    """The recipe's size, or InvalidInput (400) naming the ceiling it is above."""
    size = recipe_size(recipe)
    for value, limit, what, setting in (
        (size.depth, limits.max_depth, "derives deep (from an upload)", "CENTROID_MAX_RECIPE_DEPTH"),
        (size.datasets, limits.max_datasets, "datasets (itself included)", "CENTROID_MAX_RECIPE_DATASETS"),
        (size.steps, limits.max_steps, "steps over all its datasets", "CENTROID_MAX_RECIPE_STEPS"),
        (size.bytes, limits.max_bytes, "bytes of JSON", "CENTROID_MAX_RECIPE_BYTES"),
    ):
        if value > limit:
            raise InvalidInput(
                f"the derived dataset's recipe would be {value} {what}; at most {limit} are allowed ({setting})",
                details={"limit": limit, "value": value, "setting": setting},
            )
    return size


def recipe_summary(recipe: Recipe, size: RecipeSize) -> dict[str, Any]:
    """What listings show instead of the recipe (``GET /datasets``)."""
    graph = recipe_graph(recipe)
    return {
        "source": recipe.get("source"),
        "parent_id": graph.root.get("parent_id"),
        "inputs": input_ids(graph.root),
        "depth": size.depth,
        "datasets": size.datasets,
        "steps": size.steps,
        "bytes": size.bytes,
    }
