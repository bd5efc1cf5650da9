"""The datasets API: every endpoint, and every bad input named in the issue."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.helpers import assert_error, derive, upload_csv, workshop_dataset

SMALL = b"id,x,y\na,1,10\nb,2,20\nc,3,30\n"


def artifact_files(settings: Settings) -> list[str]:
    root = settings.resolved_artifact_dir
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def dataset_count(client: TestClient) -> int:
    return client.get("/datasets").json()["total"]  # type: ignore[no-any-return]


# --- creating ---------------------------------------------------------------------------------


def test_upload_csv_infers_types_and_keeps_the_key_as_text(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    body = upload_csv(client, "crimes", sample_csv["crimes"], "State")
    assert body["row_count"] == 50
    assert body["key_column"] == "State"
    assert body["columns"] == [
        {"name": "State", "dtype": "string"},
        {"name": "Murder", "dtype": "float64"},
        {"name": "Assault", "dtype": "int64"},
        {"name": "UrbanPop", "dtype": "int64"},
        {"name": "Rape", "dtype": "float64"},
    ]
    assert body["recipe"] == {
        "source": "upload",
        "filename": "crimes.csv",
        "columns": ["State", "Murder", "Assault", "UrbanPop", "Rape"],
    }
    assert body["id"].startswith("ds-")


def test_quoted_numbers_and_thousands_separators_are_numbers(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    densities = upload_csv(client, "densities", sample_csv["densities"], "State")
    assert densities["columns"][1] == {"name": "DensityPerMile", "dtype": "float64"}
    data = b'k,v\na,"1,210.5"\nb,"-2,000,000"\nc,.5\nd,1e3\n'
    body = upload_csv(client, "sep", data, "k")
    rows = client.get(f"/datasets/{body['id']}/rows").json()["rows"]
    assert [r[1] for r in rows] == [1210.5, -2000000.0, 0.5, 1000.0]


def test_json_body_creates_the_same_kind_of_dataset(client: TestClient) -> None:
    response = client.post(
        "/datasets",
        json={
            "name": "j",
            "key_column": "k",
            "columns": ["k", "v", "w"],
            "rows": [["a", "1,000", None], ["b", 2.5, "x"]],
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["columns"] == [
        {"name": "k", "dtype": "string"},
        {"name": "v", "dtype": "float64"},
        {"name": "w", "dtype": "string"},
    ]
    assert body["recipe"] == {"source": "json", "columns": ["k", "v", "w"]}
    rows = client.get(f"/datasets/{body['id']}/rows").json()["rows"]
    assert rows == [["a", 1000.0, None], ["b", 2.5, "x"]]


def test_other_delimiters(client: TestClient) -> None:
    body = upload_csv(client, "semi", b"k;v\na;1\nb;2\n", "k", delimiter=";")
    assert body["columns"][1]["dtype"] == "int64"


# --- reading ----------------------------------------------------------------------------------


def test_list_is_paginated_newest_first(client: TestClient) -> None:
    ids = [upload_csv(client, f"d{i}", SMALL, "id")["id"] for i in range(5)]
    page = client.get("/datasets", params={"offset": 1, "limit": 2}).json()
    assert page["total"] == 5 and page["offset"] == 1 and page["limit"] == 2
    assert [item["id"] for item in page["items"]] == ids[::-1][1:3]
    assert client.get("/datasets", params={"name": "d3"}).json()["items"][0]["id"] == ids[3]


def test_detail_has_a_summary_per_column(client: TestClient) -> None:
    body = upload_csv(client, "s", b"k,v,t\na,1,x\nb,,y\nc,4,z\n", "k")
    detail = client.get(f"/datasets/{body['id']}").json()
    summary = {c["name"]: c for c in detail["summary"]}
    assert summary["v"] == {
        "name": "v",
        "dtype": "float64",
        "count": 2,
        "null_count": 1,
        "min": 1.0,
        "max": 4.0,
        "mean": 2.5,
        "std": pytest.approx(np.std([1, 4], ddof=1)),
    }
    assert summary["t"]["min"] == "x" and summary["t"]["mean"] is None


def test_rows_are_paged_across_row_groups(tmp_path, database_url) -> None:  # type: ignore[no-untyped-def]
    from service.main import create_app

    settings = Settings(data_dir=tmp_path, database_url=database_url, parquet_row_group_rows=7, log_level="WARNING")
    data = "k,v\n" + "".join(f"r{i},{i}\n" for i in range(50))
    with TestClient(create_app(settings)) as client:
        body = upload_csv(client, "paged", data.encode(), "k")
        page = client.get(f"/datasets/{body['id']}/rows", params={"offset": 5, "limit": 10}).json()
        assert [r[1] for r in page["rows"]] == list(range(5, 15))
        assert page["total"] == 50
        tail = client.get(f"/datasets/{body['id']}/rows", params={"offset": 45, "limit": 10}).json()
        assert [r[1] for r in tail["rows"]] == list(range(45, 50))
        assert client.get(f"/datasets/{body['id']}/rows", params={"offset": 60}).json()["rows"] == []


def test_csv_download_round_trips(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    body = upload_csv(client, "crimes", sample_csv["crimes"], "State")
    response = client.get(f"/datasets/{body['id']}/csv")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    original = pd.read_csv(io.BytesIO(sample_csv["crimes"]))
    downloaded = pd.read_csv(io.BytesIO(response.content))
    pd.testing.assert_frame_equal(original, downloaded, check_dtype=False)


def test_delete_removes_row_and_file(client: TestClient, settings: Settings) -> None:
    body = upload_csv(client, "gone", SMALL, "id")
    assert artifact_files(settings) == [f"datasets/{body['id']}.parquet"]
    assert client.delete(f"/datasets/{body['id']}").status_code == 204
    assert_error(client.get(f"/datasets/{body['id']}"), 404, "not_found")
    assert artifact_files(settings) == []
    assert_error(client.delete(f"/datasets/{body['id']}"), 404, "not_found")


# --- deriving ---------------------------------------------------------------------------------


def test_workshop_data_prep(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    """Steps 5-8 of the workshop: 50 states x 5 numeric features keyed by state."""
    workshop = workshop_dataset(client, sample_csv["crimes"], sample_csv["densities"])
    assert workshop["row_count"] == 50
    assert workshop["key_column"] == "State"
    assert [c["name"] for c in workshop["columns"]] == [
        "State",
        "Murder",
        "Assault",
        "UrbanPop",
        "Rape",
        "DensityPerMile",
    ]
    assert all(c["dtype"] != "string" for c in workshop["columns"][1:])

    rows = client.get(f"/datasets/{workshop['id']}/rows", params={"limit": 50}).json()["rows"]
    crimes = pd.read_csv(io.BytesIO(sample_csv["crimes"])).set_index("State")
    densities = pd.read_csv(io.BytesIO(sample_csv["densities"])).set_index("State")["DensityPerMile"]
    expected_density = np.interp(densities, (densities.min(), densities.max()), (-1, 1))
    expected = dict(zip(densities.index, expected_density, strict=True))
    for state, murder, assault, urban, rape, density in rows:
        assert murder == crimes.loc[state, "Murder"] and assault == crimes.loc[state, "Assault"]
        assert urban == crimes.loc[state, "UrbanPop"] and rape == crimes.loc[state, "Rape"]
        assert density == pytest.approx(expected[state], abs=1e-12)

    recipe = workshop["recipe"]
    assert recipe["source"] == "derived"
    join = recipe["steps"][0]
    assert join["op"] == "join" and join["on"] == "State" and "right" not in join
    scale = recipe["inputs"][join["dataset_id"]]["steps"][0]  # the joined dataset, by reference
    assert scale["params"] == {"DensityPerMile": {"min": 0.6, "max": 975.0}}
    assert set(recipe["inputs"]) == {recipe["parent_id"], join["dataset_id"], scale_parent(recipe, join)}
    assert workshop["recipe_summary"] == {
        "source": "derived",
        "parent_id": recipe["parent_id"],
        "inputs": [recipe["parent_id"], join["dataset_id"]],
        "depth": 2,
        "datasets": 4,
        "steps": 3,
        "bytes": workshop["recipe_summary"]["bytes"],
    }


def scale_parent(recipe: dict[str, Any], join: dict[str, Any]) -> str:
    return recipe["inputs"][join["dataset_id"]]["parent_id"]  # type: ignore[no-any-return]


def test_standard_scaling_stores_mean_and_std(client: TestClient) -> None:
    body = upload_csv(client, "s", SMALL, "id")
    scaled = derive(client, body["id"], "z", [{"op": "scale", "columns": ["x", "y"], "method": "standard"}])
    params = scaled["recipe"]["steps"][0]["params"]
    assert params["x"] == {"mean": 2.0, "std": pytest.approx(np.std([1, 2, 3]))}
    values = [r[1] for r in client.get(f"/datasets/{scaled['id']}/rows").json()["rows"]]
    assert values == pytest.approx([-1.224744871, 0.0, 1.224744871])


def test_select_drop_rename(client: TestClient) -> None:
    body = upload_csv(client, "s", SMALL, "id")
    result = derive(
        client,
        body["id"],
        "shape",
        [
            {"op": "rename", "mapping": {"x": "ex", "id": "key"}},
            {"op": "drop", "columns": ["y"]},
            {"op": "select", "columns": ["ex"]},
        ],
    )
    assert [c["name"] for c in result["columns"]] == ["key", "ex"]
    assert result["key_column"] == "key"


def test_dropna_and_fillna(client: TestClient) -> None:
    body = upload_csv(client, "holes", b"k,a,b\nr1,1,\nr2,,5\nr3,3,7\n", "k")
    dropped = derive(client, body["id"], "d", [{"op": "dropna", "columns": ["a"]}])
    assert dropped["row_count"] == 2
    filled = derive(
        client,
        body["id"],
        "f",
        [{"op": "fillna", "columns": ["a"]}, {"op": "fillna", "strategy": "constant", "value": 0}],
    )
    rows = client.get(f"/datasets/{filled['id']}/rows").json()["rows"]
    assert rows == [["r1", 1.0, 0.0], ["r2", 2.0, 5.0], ["r3", 3.0, 7.0]]
    assert filled["recipe"]["steps"][0] == {"op": "fillna", "values": {"a": 2.0}}


def test_left_join_keeps_unmatched_rows(client: TestClient) -> None:
    left = upload_csv(client, "l", b"k,a\nx,1\ny,2\n", "k")
    right = upload_csv(client, "r", b"k,b\nx,10\n", "k")
    joined = derive(client, left["id"], "j", [{"op": "join", "dataset_id": right["id"], "how": "left"}])
    rows = client.get(f"/datasets/{joined['id']}/rows").json()["rows"]
    assert rows == [["x", 1, 10.0], ["y", 2, None]]


# --- bad input: clear error, nothing changed --------------------------------------------------


BAD_UPLOADS = [
    (b"", "empty"),
    (b"   \n", "empty"),
    (b"a,b,c\n", "no data rows"),
    (b"\xff\xfe\x00a,b", "NUL bytes"),
    (b"a,b\n\xe9t\xe9,1\n", "not UTF-8"),
    (b"a,a\n1,2\n", "duplicate column names: a"),
    (b"a,,c\n1,2,3\n", "empty name"),
    (b"a,b\n1,2\n3,4,5\n", "not valid CSV"),
    (b"k,v\nx,1\ny,inf\n", "not a finite number"),
    (b"k,v\nx,1\ny,NaN\n", "not a finite number"),
    (b"k,v\nx,1\ny,1e309\n", "not a finite number"),
]


@pytest.mark.parametrize(("data", "fragment"), BAD_UPLOADS)
def test_bad_csv_is_refused_and_leaves_nothing(
    client: TestClient, settings: Settings, data: bytes, fragment: str
) -> None:
    response = client.post("/datasets", files={"file": ("x.csv", data, "text/csv")}, data={"name": "bad"})
    assert_error(response, 400, "invalid_input", fragment)
    assert dataset_count(client) == 0
    assert artifact_files(settings) == []


@pytest.mark.slow
def test_key_column_problems(client: TestClient) -> None:
    assert_error(
        client.post("/datasets", files={"file": ("x.csv", SMALL)}, data={"name": "n", "key_column": "nope"}),
        400,
        "invalid_input",
        "key column 'nope' is not one of the columns",
    )
    error = assert_error(
        client.post("/datasets", files={"file": ("x.csv", b"k,v\na,1\na,2\n")}, data={"name": "n", "key_column": "k"}),
        400,
        "invalid_input",
        "duplicate values",
    )
    assert error["details"]["duplicates"] == ["a"]
    assert_error(
        client.post("/datasets", files={"file": ("x.csv", b"k,v\na,1\n,2\n")}, data={"name": "n", "key_column": "k"}),
        400,
        "invalid_input",
        "empty in row 1",
    )
    assert dataset_count(client) == 0


def test_upload_over_the_size_limit_is_413(tmp_path, database_url) -> None:  # type: ignore[no-untyped-def]
    from service.main import create_app

    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        max_upload_bytes=1000,
        max_csv_upload_bytes=2000,
        log_level="WARNING",
    )
    with TestClient(create_app(settings)) as client:
        big = b"k,v\n" + b"".join(b"row%d,%d\n" % (i, i) for i in range(500))
        response = client.post("/datasets", files={"file": ("big.csv", big)}, data={"name": "big"})
        assert_error(response, 413, "payload_too_large", "larger than the configured limit")
        assert response.json()["error"]["details"]["limit_bytes"] == 2000
        raw = client.post("/datasets?name=big", content=big, headers={"content-type": "text/csv"})
        assert_error(raw, 413, "payload_too_large")
        # CSV uploads have their own (larger) limit: 1,500 bytes of CSV pass where JSON stops at 1,000.
        small = b"k,v\n" + b"".join(b"row%d,%d\n" % (i, i) for i in range(130))
        assert 1000 < len(small) < 1900
        assert client.post("/datasets", files={"file": ("s.csv", small)}, data={"name": "s"}).status_code == 201
        client.delete(f"/datasets/{client.get('/datasets').json()['items'][0]['id']}")
        json_big = client.post("/datasets", json={"name": "j", "columns": ["a"], "rows": [[i] for i in range(1000)]})
        assert_error(json_big, 413, "payload_too_large")
        assert dataset_count(client) == 0
        assert list(settings.resolved_artifact_dir.rglob("*.parquet")) == []


def test_malformed_requests(client: TestClient) -> None:
    assert_error(
        client.post("/datasets", content=b"a,b", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"
    )
    assert_error(
        client.post("/datasets", content=b"{", headers={"content-type": "application/json"}),
        422,
        "validation_error",
        "not valid JSON",
    )
    assert_error(
        client.post("/datasets", json={"name": "x", "columns": ["a"], "rows": [[1, 2]]}),
        400,
        "invalid_input",
        "row 0 has 2 values",
    )
    assert_error(
        client.post("/datasets", json={"name": "x", "columns": ["a"], "rows": [[True]]}), 422, "validation_error"
    )
    assert_error(client.post("/datasets", json={"name": "", "columns": ["a"], "rows": [[1]]}), 422, "validation_error")
    assert_error(client.post("/datasets", files={"file": ("x.csv", SMALL)}, data={}), 422, "validation_error")
    assert_error(
        client.post("/datasets", data={"name": "no-file"}, files={"other": ("x", b"1")}),
        422,
        "validation_error",
        "`file`",
    )
    assert_error(client.get("/datasets", params={"limit": 0}), 422, "validation_error")
    assert dataset_count(client) == 0


def test_json_non_finite_numbers_are_refused(client: TestClient) -> None:
    body = '{"name": "x", "columns": ["a"], "rows": [[1.0], [NaN]]}'
    response = client.post("/datasets", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_input", "not a finite number")
    body = '{"name": "x", "columns": ["a"], "rows": [[1.0], [1e999]]}'
    response = client.post("/datasets", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_input", "not a finite number")


def test_unknown_dataset_is_404_everywhere(client: TestClient) -> None:
    for path in ("/datasets/ds-x", "/datasets/ds-x/rows", "/datasets/ds-x/csv"):
        assert_error(client.get(path), 404, "not_found", "ds-x")
    assert_error(
        client.post("/datasets/ds-x/derive", json={"name": "n", "steps": [{"op": "drop", "columns": ["a"]}]}),
        404,
        "not_found",
    )
    assert_error(client.get("/no-such-route"), 404, "not_found")


@pytest.mark.parametrize(
    ("steps", "fragment"),
    [
        ([{"op": "scale", "columns": ["x", "c"]}], "'c' is constant"),
        ([{"op": "scale", "columns": ["c"], "method": "standard"}], "standard deviation is zero"),
        ([{"op": "scale", "columns": ["t"]}], "'t' is not numeric: row 0 holds 'a'"),
        ([{"op": "scale", "columns": ["zz"]}], "unknown column(s) 'zz'"),
        ([{"op": "select", "columns": ["zz"]}], "unknown column"),
        ([{"op": "rename", "mapping": {"x": "t"}}], "duplicate column"),
        ([{"op": "fillna", "columns": ["t"], "strategy": "mean"}], "not numeric"),
        ([{"op": "fillna", "strategy": "constant"}], "`value` is required"),
        ([{"op": "dropna", "columns": ["x"]}, {"op": "drop", "columns": ["nope"]}], "step 1 (drop): drop: unknown"),
    ],
)
def test_bad_derive_steps(client: TestClient, settings: Settings, steps: list[dict], fragment: str) -> None:  # type: ignore[type-arg]
    body = upload_csv(client, "base", b"k,x,c,t\na,1,5,a\nb,2,5,b\n", "k")
    before = artifact_files(settings)
    assert_error(
        client.post(f"/datasets/{body['id']}/derive", json={"name": "d", "steps": steps}),
        400,
        "invalid_input",
        fragment,
    )
    assert dataset_count(client) == 1
    assert artifact_files(settings) == before


@pytest.mark.slow
def test_bad_joins(client: TestClient) -> None:
    left = upload_csv(client, "l", b"k,a\nx,1\ny,2\n", "k")
    dup = upload_csv(client, "dup", b"k,b\nx,1\nx,2\n")
    other_key = upload_csv(client, "o", b"id,b\nx,1\n", "id")
    same_col = upload_csv(client, "s", b"k,a\nx,1\n", "k")
    disjoint = upload_csv(client, "d", b"k,z\nq,1\n", "k")
    no_key = upload_csv(client, "n", b"a,b\n1,2\n")
    cases = [
        (left["id"], {"dataset_id": dup["id"]}, "duplicate values in dataset"),
        (left["id"], {"dataset_id": other_key["id"], "on": "k"}, "join column 'k' is missing from dataset"),
        (left["id"], {"dataset_id": left["id"], "on": "nope"}, "join column 'nope' is missing from this dataset"),
        (left["id"], {"dataset_id": same_col["id"]}, "both datasets have column(s) 'a'"),
        (left["id"], {"dataset_id": disjoint["id"]}, "leave no rows"),
        (no_key["id"], {"dataset_id": left["id"]}, "needs `on`"),
    ]
    for base, join, fragment in cases:
        response = client.post(f"/datasets/{base}/derive", json={"name": "j", "steps": [{"op": "join", **join}]})
        assert_error(response, 400, "invalid_input", fragment)
    assert_error(
        client.post(
            f"/datasets/{left['id']}/derive", json={"name": "j", "steps": [{"op": "join", "dataset_id": "ds-nope"}]}
        ),
        404,
        "not_found",
    )
    assert dataset_count(client) == 6


def test_invalid_scale_range_is_422(client: TestClient) -> None:
    body = upload_csv(client, "s", SMALL, "id")
    response = client.post(
        f"/datasets/{body['id']}/derive",
        json={"name": "d", "steps": [{"op": "scale", "columns": ["x"], "feature_range": [1, -1]}]},
    )
    assert_error(response, 422, "validation_error")


def test_request_id_is_echoed_and_in_errors(client: TestClient) -> None:
    response = client.get("/datasets/ds-x", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["error"]["request_id"] == "abc-123"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
