"""Small HTTP helpers the API tests share."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


def upload_csv(
    client: TestClient, name: str, data: bytes, key_column: str | None = None, expect: int = 201, **fields: str
) -> dict[str, Any]:
    form = {"name": name, **fields}
    if key_column is not None:
        form["key_column"] = key_column
    response = client.post("/datasets", files={"file": (f"{name}.csv", data, "text/csv")}, data=form)
    assert response.status_code == expect, response.text
    return response.json()  # type: ignore[no-any-return]


def derive(client: TestClient, dataset_id: str, name: str, steps: list[dict[str, Any]], expect: int = 201) -> dict[str, Any]:
    response = client.post(f"/datasets/{dataset_id}/derive", json={"name": name, "steps": steps})
    assert response.status_code == expect, response.text
    return response.json()  # type: ignore[no-any-return]


def assert_error(response: Any, status: int, code: str, fragment: str = "") -> dict[str, Any]:
    """The one error shape, with the expected status, code and a message fragment."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details", "request_id"}
    assert body["error"]["code"] == code, body
    assert fragment.lower() in body["error"]["message"].lower(), body
    return body["error"]  # type: ignore[no-any-return]


WORKSHOP_FEATURES = ["Murder", "Assault", "UrbanPop", "Rape", "DensityPerMile"]


def workshop_dataset(client: TestClient, crimes: bytes, densities: bytes) -> dict[str, Any]:
    """The workshop's data prep: scale density to [-1, 1], inner-join on State, select 5 features."""
    crimes_ds = upload_csv(client, "crimes", crimes, "State")
    densities_ds = upload_csv(client, "densities", densities, "State")
    scaled = derive(
        client,
        densities_ds["id"],
        "densities-scaled",
        [{"op": "scale", "columns": ["DensityPerMile"], "method": "minmax", "feature_range": [-1, 1]}],
    )
    return derive(
        client,
        crimes_ds["id"],
        "workshop",
        [
            {"op": "join", "dataset_id": scaled["id"], "how": "inner"},
            {"op": "select", "columns": WORKSHOP_FEATURES},
        ],
    )
