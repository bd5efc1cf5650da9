"""recipes by reference: datasets.recipe_summary, nested recipes rewritten as DAGs

Before this revision a derived dataset's recipe embedded its parent's whole recipe (``parent``)
and each join's (``right``), so a recipe grew with every path through its lineage, doubling per
level in the worst case. From here a recipe is its own node (``parent_id``, ``steps`` whose joins
name ``dataset_id``) plus ``inputs``: every dataset it reads from, keyed by id, each stored once.
This revision rewrites stored dataset and model recipes into that form (a dataset reached by
several paths is walked once) and adds ``datasets.recipe_summary``, what ``GET /datasets`` shows
instead of the recipe. The code reads both forms, so rows this missed would still work.

Self-contained on purpose: a migration must not change meaning when the application code does.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Recipe = dict[str, Any]

datasets = sa.table(
    "datasets", sa.column("id", sa.String), sa.column("recipe", sa.JSON), sa.column("recipe_summary", sa.JSON)
)
models = sa.table("models", sa.column("id", sa.String), sa.column("recipe", sa.JSON))


def upgrade() -> None:
    op.add_column("datasets", sa.Column("recipe_summary", sa.JSON(), nullable=True))
    connection = op.get_bind()
    for (dataset_id,) in connection.execute(sa.select(datasets.c.id)).all():
        recipe = connection.execute(sa.select(datasets.c.recipe).where(datasets.c.id == dataset_id)).scalar_one()
        recipe = _by_reference(recipe)
        connection.execute(
            datasets.update().where(datasets.c.id == dataset_id).values(recipe=recipe, recipe_summary=_summary(recipe))
        )
    for (model_id,) in connection.execute(sa.select(models.c.id).where(models.c.recipe.is_not(None))).all():
        recipe = connection.execute(sa.select(models.c.recipe).where(models.c.id == model_id)).scalar_one()
        if isinstance(recipe, dict) and _is_nested(recipe):
            connection.execute(models.update().where(models.c.id == model_id).values(recipe=_by_reference(recipe)))


NESTED_LIMIT_BYTES = 64 * 1024 * 1024


def downgrade() -> None:
    """Nest the recipes again (what the older code reads) and drop the summary column.

    A recipe that reaches a dataset by many paths grows with every path once nested (a dataset
    joined with itself 32 times: 2**32 copies); the downgrade refuses, naming it, if any recipe
    would exceed 64 MiB nested, instead of filling the database.
    """
    connection = op.get_bind()
    for table in (datasets, models):
        for (row_id,) in connection.execute(sa.select(table.c.id)).all():
            recipe = connection.execute(sa.select(table.c.recipe).where(table.c.id == row_id)).scalar_one()
            if isinstance(recipe, dict) and recipe.get("source") == "derived" and "inputs" in recipe:
                size = _nested_size(recipe)
                if size > NESTED_LIMIT_BYTES:
                    raise RuntimeError(
                        f"cannot downgrade below 0004: the recipe of {table.name} row {row_id!r} would take about "
                        f"{size} bytes nested; delete it first"
                    )
                connection.execute(table.update().where(table.c.id == row_id).values(recipe=_nested(recipe)))
    op.drop_column("datasets", "recipe_summary")


def _nested_size(recipe: Recipe) -> int:
    """Bytes of the recipe once nested, estimated without building it (each node sized once)."""
    nodes: dict[str, Recipe] = recipe["inputs"]
    sizes: dict[str, int] = {}

    def size(node: Recipe) -> int:
        own = len(json.dumps({key: value for key, value in node.items() if key != "inputs"}))
        references = [node["parent_id"]] if node.get("source") == "derived" else []
        references += [r["dataset_id"] for r in node.get("steps", []) if r.get("op") == "join"]
        for dataset_id in references:
            if dataset_id not in sizes:
                sizes[dataset_id] = size(nodes[dataset_id])
        return own + sum(sizes[dataset_id] for dataset_id in references)

    return size(recipe)


def _is_nested(recipe: Recipe) -> bool:
    return recipe.get("source") == "derived" and "parent" in recipe


def _by_reference(recipe: Recipe) -> Recipe:
    if not _is_nested(recipe):
        return recipe
    nodes: dict[str, Recipe] = {}
    root = _unnest(recipe, nodes)
    return {**root, "inputs": nodes}


def _unnest(recipe: Recipe, nodes: dict[str, Recipe]) -> Recipe:
    if not _is_nested(recipe):
        nodes.update(recipe.get("inputs") or {})
        return {key: value for key, value in recipe.items() if key != "inputs"}

    def reference(inner: Recipe, dataset_id: str | None) -> str:
        node_id = dataset_id or "~" + hashlib.sha256(json.dumps(inner, sort_keys=True).encode()).hexdigest()[:24]
        if node_id not in nodes:
            nodes[node_id] = _unnest(inner, nodes)
        return node_id

    node = {key: value for key, value in recipe.items() if key != "parent"}
    node["parent_id"] = reference(recipe["parent"], recipe.get("parent_id"))
    steps = []
    for record in recipe.get("steps", []):
        if record.get("op") == "join" and "right" in record:
            right_id = reference(record["right"], record.get("dataset_id"))
            record = {**{key: value for key, value in record.items() if key != "right"}, "dataset_id": right_id}
        steps.append(record)
    node["steps"] = steps
    return node


def _inputs_of(node: Recipe) -> list[str]:
    if node.get("source") != "derived":
        return []
    ids = [node["parent_id"], *(r["dataset_id"] for r in node.get("steps", []) if r.get("op") == "join")]
    return list(dict.fromkeys(ids))


def _summary(recipe: Recipe) -> dict[str, Any]:
    nodes: dict[str, Recipe] = recipe.get("inputs") or {}
    root = {key: value for key, value in recipe.items() if key != "inputs"}
    depths: dict[str, int] = {}

    def depth(node: Recipe) -> int:
        best = 0
        for dataset_id in _inputs_of(node):
            if dataset_id not in depths:
                depths[dataset_id] = depth(nodes[dataset_id]) if dataset_id in nodes else 0
            best = max(best, depths[dataset_id] + 1)
        return best

    everything = [root, *nodes.values()]
    return {
        "source": recipe.get("source"),
        "parent_id": root.get("parent_id"),
        "inputs": _inputs_of(root),
        "depth": depth(root),
        "datasets": len(everything),
        "steps": sum(len(node.get("steps", [])) for node in everything if node.get("source") == "derived"),
        "bytes": len(json.dumps(recipe, separators=(",", ":"), ensure_ascii=False).encode()),
    }


def _nested(recipe: Recipe) -> Recipe:
    nodes: dict[str, Recipe] = recipe["inputs"]
    built: dict[str, Recipe] = {}

    def nest(node: Recipe) -> Recipe:
        if node.get("source") != "derived":
            return node

        def inner(dataset_id: str) -> Recipe:
            if dataset_id not in built:
                built[dataset_id] = nest(nodes[dataset_id])
            return built[dataset_id]

        steps = [
            {**record, "right": inner(record["dataset_id"])} if record.get("op") == "join" else record
            for record in node.get("steps", [])
        ]
        plain = {key: value for key, value in node.items() if key != "inputs"}
        return {**plain, "parent": inner(node["parent_id"]), "steps": steps}

    return nest(recipe)
