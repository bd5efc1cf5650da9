"""Derive steps on tables (pandas), and their replay on new raw rows.

Applying a step *fits* it (a scaler's min/max, a fill value) and returns the fitted form, which the
new dataset's recipe keeps. :func:`replay` applies a recipe's fitted steps to raw rows that
arrive later (a prediction request), so they are transformed exactly like the training data.
Each step is one class of :mod:`service.datasets.steps` (its fitted parameters and what it does);
this module walks recipes and hands each step to its class.

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

from schemas.datasets import DeriveStep
from service.datasets.parsing import check_key
from service.datasets.steps import FittedStep as FittedStep
from service.datasets.steps import FittedStepBase, fit_step, parse_steps
from service.datasets.steps import Lineage as Lineage
from service.datasets.steps import Table as Table
from service.datasets.steps import TableLoader as TableLoader
from service.datasets.steps import is_numeric as is_numeric
from service.datasets.steps import minmax_params as minmax_params
from service.datasets.steps import require_columns as require_columns
from service.datasets.steps import require_numeric as require_numeric
from service.datasets.steps import scale_values as scale_values
from service.datasets.steps import standard_params as standard_params
from service.datasets.steps import unscale_values as unscale_values
from service.errors import InvalidInput

Recipe = dict[str, Any]  # a recipe as stored (JSON); its steps are read with ``steps.parse_step``
T = TypeVar("T")


def apply_steps(table: Table, steps: Sequence[DeriveStep], load: TableLoader) -> tuple[Table, list[FittedStep]]:
    """Apply steps in order; return the result and each step's fitted form."""
    fitted: list[FittedStep] = []
    for index, step in enumerate(steps):
        try:
            record = fit_step(table, step, load)
            table = record.apply(table, load)
        except InvalidInput as exc:
            exc.message = f"step {index} ({step.op}): {exc.message}"
            raise
        fitted.append(record)
    if table.frame.empty or table.frame.shape[1] == 0:
        raise InvalidInput("the steps leave no rows or no columns", details={"shape": list(table.frame.shape)})
    return table, fitted


def replay(recipe: Recipe, raw: pd.DataFrame) -> pd.DataFrame:
    """Transform raw rows the way ``recipe`` transformed its dataset.

    Rows are never dropped or joined here: a join's other side is replayed on the same raw rows
    and its columns are added alongside. Raw rows name the columns of the original uploads. Each
    dataset of the recipe is replayed once, however many times it is reached. A step this code
    does not know is an InvalidInput (see ``steps.parse_step``), never skipped.
    """

    def visit(node: Recipe, resolve: Callable[[str], pd.DataFrame]) -> pd.DataFrame:
        if node.get("source") != "derived":
            return raw[[c for c in node.get("columns", raw.columns) if c in raw.columns]]
        table = Table(resolve(node["parent_id"]), None)
        for record in parse_steps(node["steps"]):
            table = record.replay(table, resolve)
        return table.frame

    return fold_recipe(recipe, visit)


def ensure_unique_key(table: Table) -> None:
    if table.key_column is not None:
        check_key(table.frame, table.key_column)


def column_lineage(recipe: Recipe) -> dict[str, Lineage]:
    """Each column of a recipe's dataset traced back to an uploaded column."""

    def visit(node: Recipe, resolve: Callable[[str], dict[str, Lineage]]) -> dict[str, Lineage]:
        if node.get("source") != "derived":
            return {name: Lineage(name) for name in node.get("columns", [])}
        lineage = dict(resolve(node["parent_id"]))
        for record in parse_steps(node["steps"]):
            lineage = record.lineage(lineage, resolve)
        return lineage

    return fold_recipe(recipe, visit)


def unscale_column(values: np.ndarray, lineage: Lineage) -> np.ndarray:
    """Undo a column's scalings, last first (centroids back in original units)."""
    for record in reversed(lineage.scalings):
        (params,) = record.params.values()
        values = unscale_values(values, record.method, params, record.feature_range)
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
        if isinstance(record, Mapping) and record.get("op") == "join" and "right" in record:
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


def derived_recipe(
    parent_id: str, steps: Sequence[FittedStep | Mapping[str, Any]], inputs: Mapping[str, Recipe]
) -> Recipe:
    """A derived dataset's recipe: its node (``parent_id``, ``steps``) and ``inputs``, the node of
    every dataset it reads from, each once. ``inputs`` maps each dataset the steps read directly
    (the parent and each join's other side) to that dataset's own stored recipe.

    ``steps`` are fitted steps, stored as their JSON (``model_dump(mode="json")``), or steps already
    in that form, kept as they are (a planned derive's ``{"op", "dataset_id"}``, for its size check)."""
    nodes: dict[str, Recipe] = {}
    for dataset_id, recipe in inputs.items():
        graph = recipe_graph(recipe)
        for node_id, node in graph.nodes.items():
            nodes.setdefault(node_id, node)
        nodes.setdefault(dataset_id, graph.root)
    stored = [step.model_dump(mode="json") if isinstance(step, FittedStepBase) else step for step in steps]
    return {"source": "derived", "parent_id": parent_id, "steps": stored, "inputs": nodes}


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
