"""Joins whose key columns have different names, and columns both sides have (`left_on`, `right_on`,
`suffixes`): the issue's example end to end over HTTP, its refusals, and the OpenAPI document."""

from __future__ import annotations

import io
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from tests.helpers import assert_error, derive, run_worker_until_idle, upload_csv

# Other facts about some states, keyed by `state_name`; `Murder` is a column the crimes table has too.
FACTS = {
    "name": "state-facts",
    "key_column": "state_name",
    "columns": ["state_name", "Murder", "Income"],
    "rows": [["Texas", 5.0, 52], ["Alabama", 6.1, 48], ["Ohio", 4.0, 58], ["Atlantis", 1.0, 99]],
}


@pytest.fixture
def datasets(client: TestClient, sample_csv: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, Any]]:
    crimes = upload_csv(client, "crimes", sample_csv["crimes"], "State")
    response = client.post("/datasets", json=FACTS)
    assert response.status_code == 201, response.text
    return crimes, response.json()


def rows(client: TestClient, dataset_id: str) -> dict[str, Any]:
    response = client.get(f"/datasets/{dataset_id}/rows", params={"limit": 100})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def join_request(facts: dict[str, Any], **fields: Any) -> list[dict[str, Any]]:
    return [{"op": "join", "dataset_id": facts["id"], **fields}]


def test_key_to_key_join_with_suffixes(
    client: TestClient, sample_csv: dict[str, bytes], datasets: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    crimes, facts = datasets
    joined = derive(client, crimes["id"], "crimes-and-facts", join_request(facts, suffixes=["_crimes", "_facts"]))
    assert joined["key_column"] == "State"
    assert [(c["name"], c["dtype"]) for c in joined["columns"]] == [
        ("State", "string"),
        ("Murder_crimes", "float64"),
        ("Assault", "int64"),
        ("UrbanPop", "int64"),
        ("Rape", "float64"),
        ("Murder_facts", "float64"),
        ("Income", "int64"),
    ]
    page = rows(client, joined["id"])
    crimes_frame = pd.read_csv(io.BytesIO(sample_csv["crimes"])).set_index("State")
    # Inner: the crimes table's order (Alabama comes before Ohio and Texas); no `state_name` column.
    assert [row[0] for row in page["rows"]] == ["Alabama", "Ohio", "Texas"]
    for state, murder, assault, urban, rape, murder_facts, income in page["rows"]:
        assert murder == crimes_frame.loc[state, "Murder"] and assault == crimes_frame.loc[state, "Assault"]
        assert urban == crimes_frame.loc[state, "UrbanPop"] and rape == crimes_frame.loc[state, "Rape"]
        facts_row = next(r for r in FACTS["rows"] if r[0] == state)
        assert [murder_facts, income] == facts_row[1:]
    join = joined["recipe"]["steps"][0]
    assert join == {
        "op": "join",
        "dataset_id": facts["id"],
        "how": "inner",
        "left_on": "State",
        "right_on": "state_name",
        "suffixes": ["_crimes", "_facts"],
        "suffixed": ["Murder"],
    }

    # A left join keeps every state; later steps use the suffixed names.
    kept = derive(
        client,
        crimes["id"],
        "all-states",
        [
            *join_request(facts, how="left", left_on="State", right_on="state_name", suffixes=["", "_facts"]),
            {"op": "fillna", "columns": ["Murder_facts", "Income"], "strategy": "constant", "value": 0},
            {"op": "select", "columns": ["Murder", "Murder_facts", "Income"]},
        ],
    )
    assert kept["row_count"] == 50 and [c["name"] for c in kept["columns"]] == [
        "State",
        "Murder",
        "Murder_facts",
        "Income",
    ]
    by_state = {row[0]: row[1:] for row in rows(client, kept["id"])["rows"]}
    assert by_state["Alabama"] == [13.2, 6.1, 48.0] and by_state["Alaska"] == [10.0, 0.0, 0.0]


def test_without_suffixes_a_shared_column_is_a_400_that_says_what_to_do(
    client: TestClient, datasets: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    crimes, facts = datasets
    response = client.post(f"/datasets/{crimes['id']}/derive", json={"name": "j", "steps": join_request(facts)})
    error = assert_error(response, 400, "invalid_input", "both datasets have column(s) 'Murder'; pass `suffixes`")
    assert error["details"] == {"columns": ["Murder"]}
    # Dropping it first works as before, key to key.
    facts_only = derive(client, facts["id"], "facts-income", [{"op": "drop", "columns": ["Murder"]}])
    joined = derive(client, crimes["id"], "j", join_request(facts_only))
    assert [c["name"] for c in joined["columns"]][-1] == "Income" and joined["row_count"] == 3


@pytest.mark.parametrize(
    ("fields", "fragment", "details"),
    [
        ({"on": "State", "left_on": "State"}, "join takes `on`", {"fields": ["on", "left_on"]}),
        ({"on": "State", "right_on": "state_name"}, "or `left_on` and `right_on`, not both", None),
        ({"on": "State", "suffixes": ["_l", "_r"]}, "join column 'State' is missing from dataset", {"on": "State"}),
        ({"left_on": "Nope", "suffixes": ["_l", "_r"]}, "join column 'Nope' is missing from this dataset", None),
        ({"right_on": "Nope"}, "join column 'Nope' is missing from dataset ds-", {"on": "Nope"}),
        ({"suffixes": ["", ""]}, "the suffixes '' and '' leave column(s) 'Murder' twice", None),
        ({"suffixes": ["_x", "_x"]}, "leave column(s) 'Murder_x' twice", {"columns": ["Murder_x"]}),
    ],
)
def test_join_refusals(
    client: TestClient,
    datasets: tuple[dict[str, Any], dict[str, Any]],
    fields: dict[str, Any],
    fragment: str,
    details: Any,
) -> None:
    crimes, facts = datasets
    before = client.get("/datasets").json()["total"]
    response = client.post(
        f"/datasets/{crimes['id']}/derive", json={"name": "j", "steps": join_request(facts, **fields)}
    )
    error = assert_error(response, 400, "invalid_input", fragment)
    assert error["message"].startswith("step 0 (join): ")
    if details is not None:
        assert error["details"] == {**error["details"], **details}
    assert client.get("/datasets").json()["total"] == before


def test_a_dataset_without_a_key_column_needs_the_join_columns_named(
    client: TestClient, datasets: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    crimes, facts = datasets
    keyless = derive(client, facts["id"], "keyless", [{"op": "drop", "columns": ["state_name"]}])
    assert keyless["key_column"] is None
    response = client.post(f"/datasets/{keyless['id']}/derive", json={"name": "j", "steps": join_request(crimes)})
    assert_error(response, 400, "invalid_input", "join needs `on` (or `left_on` and `right_on`)")
    response = client.post(
        f"/datasets/{crimes['id']}/derive", json={"name": "j", "steps": join_request(keyless, suffixes=["", "_f"])}
    )
    assert_error(response, 400, "invalid_input", "which has no key column either: pass `right_on`")


def test_suffixes_that_are_not_a_pair_are_a_422(
    client: TestClient, datasets: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    crimes, facts = datasets
    for suffixes in (["_x"], ["_x", "_y", "_z"], ["_x\n", "_y"], "_x"):
        response = client.post(
            f"/datasets/{crimes['id']}/derive", json={"name": "j", "steps": join_request(facts, suffixes=suffixes)}
        )
        assert_error(response, 422, "validation_error")


def test_an_async_derive_joins_the_same_way(
    client: TestClient, datasets: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    crimes, facts = datasets
    steps = join_request(facts, how="left", right_on="state_name", suffixes=["_crimes", "_facts"])
    response = client.post(
        f"/datasets/{crimes['id']}/derive",
        json={"name": "later", "steps": steps},
        headers={"Prefer": "respond-async"},
    )
    assert response.status_code == 202, response.text
    run_worker_until_idle(client.app)
    task = client.get(f"/dataset-tasks/{response.json()['id']}").json()
    assert task["status"] == "Completed", task
    now = derive(client, crimes["id"], "now", steps)
    assert rows(client, task["dataset_id"])["rows"] == rows(client, now["id"])["rows"]
    later = client.get(f"/datasets/{task['dataset_id']}").json()
    assert later["recipe"]["steps"] == now["recipe"]["steps"]


def test_the_openapi_document_describes_the_join_fields(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    join = schemas["JoinStep"]
    for field in ("on", "left_on", "right_on", "suffixes"):
        assert join["properties"][field].get("description"), field
        assert field not in join.get("required", [])
    suffixes = join["properties"]["suffixes"]["anyOf"][0]
    assert suffixes["type"] == "array" and suffixes["minItems"] == 2 and suffixes["maxItems"] == 2
    assert join["properties"]["suffixes"]["examples"] == [["_crimes", "_facts"]]
    assert any("left_on" in example for example in join["examples"])
