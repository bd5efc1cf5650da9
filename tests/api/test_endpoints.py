"""Endpoints: lifecycle, SageMaker's inference contract, friendly predictions, model switches."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings
from tests.helpers import (
    BLOBS_CSV,
    LiveServer,
    assert_error,
    deployed,
    run_worker_until_idle,
    trained_model,
    upload_csv,
    wait_for,
)


@pytest.fixture
def model(client: TestClient) -> dict:  # type: ignore[type-arg]
    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    return trained_model(client, blobs["id"])


@pytest.fixture
def endpoint(client: TestClient, model: dict) -> dict:  # type: ignore[type-arg]
    return deployed(client, model["id"])


def clusters_of(client: TestClient, model: dict) -> dict[str, int]:  # type: ignore[type-arg]
    return client.get(f"/models/{model['id']}/assignments").json()["clusters"]  # type: ignore[no-any-return]


def test_lifecycle(client: TestClient, model: dict) -> None:  # type: ignore[type-arg]
    created = client.post("/endpoints", json={"name": "ep", "model_id": model["id"]})
    assert created.status_code == 202 and created.json()["status"] == "Creating"
    assert_error(
        client.post("/endpoints/ep/invocations", content="0,0", headers={"content-type": "text/csv"}),
        409,
        "conflict",
        "Creating",
    )
    run_worker_until_idle(client.app)
    assert client.get("/endpoints/ep").json()["status"] == "InService"
    assert client.get("/endpoints", params={"status": "InService"}).json()["total"] == 1
    assert_error(
        client.post("/endpoints", json={"name": "ep", "model_id": model["id"]}), 409, "conflict", "already exists"
    )
    deleting = client.delete("/endpoints/ep")
    assert deleting.status_code == 202 and deleting.json()["status"] == "Deleting"
    assert_error(
        client.post("/endpoints/ep/invocations", content="0,0", headers={"content-type": "text/csv"}),
        409,
        "conflict",
        "Deleting",
    )
    run_worker_until_idle(client.app)
    assert_error(client.get("/endpoints/ep"), 404, "not_found")


def test_unknown_things_are_404(client: TestClient, model: dict) -> None:  # type: ignore[type-arg]
    assert_error(client.post("/endpoints", json={"name": "ep", "model_id": "mdl-nope"}), 404, "not_found")
    for method, path in (("get", "/endpoints/x"), ("delete", "/endpoints/x")):
        assert_error(getattr(client, method)(path), 404, "not_found")
    assert_error(client.put("/endpoints/x", json={"model_id": model["id"]}), 404, "not_found")
    assert_error(
        client.post("/endpoints/x/invocations", content="1,2", headers={"content-type": "text/csv"}), 404, "not_found"
    )
    assert_error(client.post("/endpoints/x/predictions", json={"rows": [{"x": 1, "y": 2}]}), 404, "not_found")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/csv", "0.1,0.1\n10,0\n\n0,10.2\n"),
        ("text/csv; charset=utf-8", "0.1,0.1\n10,0\n0,10.2"),
        (
            "application/json",
            json.dumps({"instances": [{"features": [0.1, 0.1]}, {"features": [10, 0]}, {"features": [0, 10.2]}]}),
        ),
        (
            "application/json",
            json.dumps(
                {
                    "instances": [
                        {"data": {"features": {"values": [0.1, 0.1]}}},
                        {"features": [10, 0]},
                        {"features": ["0", "10.2"]},
                    ]
                }
            ),
        ),
        ("application/jsonlines", '{"features": [0.1, 0.1]}\n{"features": [10, 0]}\n{"features": [0, 10.2]}\n'),
    ],
)
@pytest.mark.slow
def test_invocations_accept_sagemaker_request_formats(
    client: TestClient, model: dict, endpoint: dict, content_type: str, body: str
) -> None:  # type: ignore[type-arg]
    response = client.post("/endpoints/ep/invocations", content=body, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    predictions = response.json()["predictions"]
    clusters = clusters_of(client, model)
    assert [p["closest_cluster"] for p in predictions] == [float(clusters[k]) for k in ("a0", "b0", "c0")]
    assert isinstance(predictions[0]["closest_cluster"], float)
    centroids = np.array(client.get(f"/models/{model['id']}/centroids").json()["centroids"])
    expected = np.linalg.norm(np.array([0.1, 0.1]) - centroids[clusters["a0"]])
    assert predictions[0]["distance_to_cluster"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("accept", "media", "parse"),
    [
        (None, "application/json", lambda text: [json.loads(text)["predictions"][0]["closest_cluster"]]),
        ("*/*", "application/json", lambda text: [json.loads(text)["predictions"][0]["closest_cluster"]]),
        (
            "application/jsonlines",
            "application/jsonlines",
            lambda text: [json.loads(text.splitlines()[0])["closest_cluster"]],
        ),
        ("text/csv", "text/csv", lambda text: [float(text.splitlines()[0].split(",")[0])]),
        ("application/xml;q=0.9, text/csv;q=0.5", "text/csv", lambda text: [float(text.split(",")[0])]),
    ],
)
def test_invocations_answer_per_accept(
    client: TestClient, model: dict, endpoint: dict, accept: str | None, media: str, parse
) -> None:  # type: ignore[no-untyped-def, type-arg]
    headers = {"content-type": "text/csv"} | ({"accept": accept} if accept else {})
    response = client.post("/endpoints/ep/invocations", content="0.1,0.1\n", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(media)
    assert parse(response.text) == [float(clusters_of(client, model)["a0"])]


@pytest.mark.parametrize(
    ("headers", "body", "status", "code", "fragment"),
    [
        ({"content-type": "application/xml"}, "<x/>", 415, "unsupported_media_type", "application/xml"),
        ({"content-type": "text/csv", "accept": "application/xml"}, "1,2", 406, "not_acceptable", "application/xml"),
        ({"content-type": "text/csv"}, "1,2,3", 400, "invalid_input", "row 0 has 3 features; the model expects 2"),
        ({"content-type": "text/csv"}, "1,abc", 400, "invalid_input", "'abc' is not a number"),
        ({"content-type": "text/csv"}, "1,nan", 400, "invalid_input", "not a finite number"),
        ({"content-type": "text/csv"}, "1,inf", 400, "invalid_input", "not a finite number"),
        ({"content-type": "text/csv"}, "1,1e309", 400, "invalid_input", "not a finite number"),
        ({"content-type": "text/csv"}, "", 400, "invalid_input", "empty"),
        (
            {"content-type": "application/json"},
            '{"instances": [{"features": [1, NaN]}]}',
            400,
            "invalid_input",
            "not a finite number",
        ),
        (
            {"content-type": "application/json"},
            '{"instances": [{"features": [1, true]}]}',
            400,
            "invalid_input",
            "not a number",
        ),
        ({"content-type": "application/json"}, '{"rows": []}', 400, "invalid_input", "instances"),
        ({"content-type": "application/json"}, '{"instances": [}', 400, "invalid_input", "not valid JSON"),
        ({"content-type": "application/json"}, '{"instances": []}', 400, "invalid_input", "no rows"),
        (
            {"content-type": "application/jsonlines"},
            '{"features": [1, 2]}\n{"x": 1}\n',
            400,
            "invalid_input",
            "instance 1",
        ),
    ],
)
@pytest.mark.slow
def test_bad_invocations(
    client: TestClient, endpoint: dict, headers: dict, body: str, status: int, code: str, fragment: str
) -> None:  # type: ignore[type-arg]
    assert_error(client.post("/endpoints/ep/invocations", content=body, headers=headers), status, code, fragment)


def test_row_limit_is_413(tmp_path, database_url) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(
        data_dir=tmp_path, database_url=database_url, max_invocation_rows=5, embedded_worker=False, log_level="WARNING"
    )
    with TestClient(create_app(settings)) as client:
        blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
        deployed(client, trained_model(client, blobs["id"])["id"])
        too_many = "1,2\n" * 6
        assert_error(
            client.post("/endpoints/ep/invocations", content=too_many, headers={"content-type": "text/csv"}),
            413,
            "payload_too_large",
            "at most 5",
        )
        instances = json.dumps({"instances": [{"features": [1, 2]}] * 6})
        assert_error(
            client.post("/endpoints/ep/invocations", content=instances, headers={"content-type": "application/json"}),
            413,
            "payload_too_large",
        )
        assert_error(
            client.post("/endpoints/ep/predictions", json={"rows": [{"x": 1, "y": 2}] * 6}), 413, "payload_too_large"
        )
        assert_error(
            client.post("/endpoints/ep/predictions", json={"dataset_id": blobs["id"]}), 413, "payload_too_large"
        )
        assert (
            client.post(
                "/endpoints/ep/invocations", content="1,2\n" * 5, headers={"content-type": "text/csv"}
            ).status_code
            == 200
        )


def test_predictions_label_sort_and_count(client: TestClient, model: dict, endpoint: dict) -> None:  # type: ignore[type-arg]
    blobs_id = model["train_dataset_id"]
    response = client.post(
        "/endpoints/ep/predictions",
        json={"dataset_id": blobs_id, "sort": "cluster,distance", "include_distances": True},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    rows = body["predictions"]
    assert len(rows) == 60 and body["model_id"] == model["id"]
    assert rows == sorted(rows, key=lambda r: (r["closest_cluster"], r["distance_to_cluster"]))
    assert sorted(body["cluster_counts"].values()) == [20, 20, 20]
    for row in rows:
        assert len(row["distances"]) == 3
        assert row["distances"][row["closest_cluster"]] == pytest.approx(row["distance_to_cluster"])
        assert min(row["distances"]) == pytest.approx(row["distance_to_cluster"])
    reverse = client.post("/endpoints/ep/predictions", json={"dataset_id": blobs_id, "sort": "-distance"}).json()[
        "predictions"
    ]
    assert [r["distance_to_cluster"] for r in reverse] == sorted((r["distance_to_cluster"] for r in rows), reverse=True)


def test_predictions_from_rows_with_keys(client: TestClient, model: dict, endpoint: dict) -> None:  # type: ignore[type-arg]
    body = client.post(
        "/endpoints/ep/predictions",
        json={"rows": [{"id": "near-b", "x": 10.1, "y": "0.2"}, {"id": "near-a", "x": 0, "y": 0}]},
    ).json()
    clusters = clusters_of(client, model)
    assert [(p["key"], p["closest_cluster"]) for p in body["predictions"]] == [
        ("near-b", clusters["b0"]),
        ("near-a", clusters["a0"]),
    ]
    assert body["predictions"][0]["distances"] is None
    assert sum(body["cluster_counts"].values()) == 2 and len(body["cluster_counts"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("request_body", "status", "fragment"),
    [
        ({"rows": [{"x": 1}]}, 400, "lack the model's feature(s) 'y'"),
        ({"rows": [{"x": 1, "y": "abc"}]}, 400, "column 'y' is not numeric: row 0 holds 'abc'"),
        ({"rows": [{"x": 1, "y": None}]}, 400, "missing or not a finite number"),
        ({"rows": [{"x": 1, "y": 2}], "dataset_id": "ds-x"}, 400, "exactly one"),
        ({}, 400, "exactly one"),
        ({"rows": [{"x": 1, "y": 2}], "raw": True}, 200, ""),
        ({"rows": [{"x": 1, "y": 2}], "sort": "bogus"}, 422, ""),
        ({"dataset_id": "ds-nope"}, 404, "ds-nope"),
    ],
)
def test_bad_prediction_requests(
    client: TestClient, endpoint: dict, request_body: dict, status: int, fragment: str
) -> None:  # type: ignore[type-arg]
    response = client.post("/endpoints/ep/predictions", json=request_body)
    if status == 200:
        assert response.status_code == 200, response.text
        return
    code = {400: "invalid_input", 404: "not_found", 422: "validation_error"}[status]
    assert_error(response, status, code, fragment)


def test_raw_rows_go_through_the_training_recipe(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    from tests.helpers import workshop_dataset

    workshop = workshop_dataset(client, sample_csv["crimes"], sample_csv["densities"])
    model = trained_model(client, workshop["id"], hyperparameters={"k": 10, "seed": 3})
    deployed(client, model["id"])
    raw = {"State": "Alabama", "Murder": 13.2, "Assault": 236, "UrbanPop": 58, "Rape": 21.2, "DensityPerMile": 71.3}
    from_raw = client.post("/endpoints/ep/predictions", json={"rows": [raw], "raw": True}).json()["predictions"][0]
    expected = client.get(f"/models/{model['id']}/assignments").json()
    assert from_raw["key"] == "Alabama"
    assert from_raw["closest_cluster"] == expected["clusters"]["Alabama"]
    assert from_raw["distance_to_cluster"] == pytest.approx(expected["distances"]["Alabama"], rel=1e-9)


@pytest.mark.slow
def test_switch_model_without_a_failed_request(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """PUT /endpoints/{name} while clients hammer the endpoint: every request succeeds."""
    settings = settings.model_copy(update={"embedded_worker": True, "worker_poll_interval": 0.05})
    app = create_app(settings)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        blobs = http.post(
            "/datasets", files={"file": ("b.csv", BLOBS_CSV)}, data={"name": "b", "key_column": "id"}
        ).json()
        ids = []
        for name, k in (("first", 3), ("second", 2)):
            http.post(
                "/training-jobs",
                json={"name": name, "train_dataset_id": blobs["id"], "hyperparameters": {"k": k, "seed": 1}},
            )
            job = wait_for(lambda n=name: http.get(f"/training-jobs/{n}").json(), lambda j: j["status"] == "Completed")
            ids.append(job["model_id"])
        http.post("/endpoints", json={"name": "ep", "model_id": ids[0]})
        wait_for(lambda: http.get("/endpoints/ep").json(), lambda e: e["status"] == "InService")

        statuses: list[int] = []
        stop = threading.Event()

        def hammer() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as own:
                while not stop.is_set():
                    response = own.post(
                        "/endpoints/ep/invocations", content="0,0\n10,0\n", headers={"content-type": "text/csv"}
                    )
                    statuses.append(response.status_code)

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(statuses), lambda n: n > 20)
        switched = http.put("/endpoints/ep", json={"model_id": ids[1]})
        assert switched.status_code == 202 and switched.json()["status"] == "Updating"
        final = wait_for(lambda: http.get("/endpoints/ep").json(), lambda e: e["status"] == "InService")
        count = len(statuses)
        wait_for(lambda: len(statuses), lambda n: n > count + 20)
        stop.set()
        for thread in threads:
            thread.join()
    assert final["model_id"] == ids[1] and final["pending_model_id"] is None
    assert statuses and set(statuses) == {200}


def test_switch_is_refused_mid_transition(client: TestClient, model: dict) -> None:  # type: ignore[type-arg]
    client.post("/endpoints", json={"name": "ep", "model_id": model["id"]})
    assert_error(client.put("/endpoints/ep", json={"model_id": model["id"]}), 409, "conflict", "Creating")
    run_worker_until_idle(client.app)
    assert_error(client.put("/endpoints/ep", json={"model_id": "mdl-nope"}), 404, "not_found")


def test_prediction_rows_with_keys_the_model_does_not_use_are_refused_before_any_work(
    client: TestClient,
    endpoint: dict,  # type: ignore[type-arg]
) -> None:
    """A read key used to burn 15 s of CPU with one row of 5,000 keys (57 KB): now a 400 at once."""
    import time

    wide = {f"c{i}": 1 for i in range(5_000)}
    for raw in (False, True):
        started = time.perf_counter()
        body = assert_error(
            client.post("/endpoints/ep/predictions", json={"rows": [wide], "raw": raw}),
            400,
            "invalid_input",
            "does not use",
        )
        assert time.perf_counter() - started < 2.0
        assert body["details"]["unknown_count"] == 5_000 and len(body["details"]["unknown"]) == 10
    many = [{f"k{r}_{i}": 1 for i in range(100)} for r in range(100)]
    assert_error(client.post("/endpoints/ep/predictions", json={"rows": many}), 400, "invalid_input", "does not use")
    # The model's own columns (and its key) are fine, in any order.
    ok = client.post("/endpoints/ep/predictions", json={"rows": [{"y": 0.0, "x": 0.1, "id": "p"}]})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["key"] == "p"


def imported(client: TestClient, feature_names: str, name: str = "imported") -> str:
    from service.engine import write_model_tar

    dim = len(feature_names.split(","))
    centers = np.arange(2.0 * dim).reshape(2, dim)
    response = client.post(
        "/models/import",
        files={"file": ("model.tar.gz", write_model_tar(centers), "application/gzip")},
        data={"name": name, "feature_names": feature_names},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.mark.slow
def test_switch_to_a_model_with_other_features_needs_allow_feature_change(
    client: TestClient, model: dict[str, Any], endpoint: dict[str, Any]
) -> None:
    """Issue 16 finding 12: a 5-feature endpoint switched to a 2-feature model broke its clients."""
    three = imported(client, "a,b,c", "three")
    error = assert_error(client.put("/endpoints/ep", json={"model_id": three}), 409, "conflict", "allow_feature_change")
    assert "['a', 'b', 'c']" in error["message"] and "['x', 'y']" in error["message"]
    assert error["details"]["endpoint_feature_names"] == ["x", "y"]
    assert error["details"]["model_feature_names"] == ["a", "b", "c"]
    # The order is part of the contract (SageMaker's CSV and JSON invocations are positional).
    swapped = imported(client, "y,x", "swapped")
    assert_error(client.put("/endpoints/ep", json={"model_id": swapped}), 409, "conflict", "['y', 'x']")
    unchanged = client.get("/endpoints/ep").json()
    assert unchanged["status"] == "InService" and unchanged["model_id"] == model["id"]
    assert unchanged["pending_model_id"] is None
    # Asked for explicitly, the switch goes ahead.
    switched = client.put("/endpoints/ep", json={"model_id": three, "allow_feature_change": True})
    assert switched.status_code == 202 and switched.json()["status"] == "Updating"
    run_worker_until_idle(client.app)
    assert client.get("/endpoints/ep").json()["model_id"] == three
    # Same features, another model: no flag needed.
    also_three = imported(client, "a,b,c", "also-three")
    assert client.put("/endpoints/ep", json={"model_id": also_three}).status_code == 202


def test_allow_feature_change_is_documented(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["EndpointModelSwitch"]
    field = schema["properties"]["allow_feature_change"]
    assert field["default"] is False and field["description"] and field["examples"] == [True]
    assert any(example.get("allow_feature_change") for example in schema["examples"])


def test_create_and_switch_to_a_deleted_model_answer_the_true_reason(client: TestClient, model: dict[str, Any]) -> None:
    """Issue 16 finding 7 (sequential form): never "already exists" for a model that is gone."""
    other = imported(client, "x,y")
    assert client.delete(f"/models/{other}").status_code == 204
    assert_error(client.post("/endpoints", json={"name": "ep2", "model_id": other}), 404, "not_found", "model")
    deployed(client, model["id"])
    assert_error(client.put("/endpoints/ep", json={"model_id": other}), 404, "not_found", "model")
    assert_error(client.delete(f"/models/{model['id']}"), 409, "conflict", "deployed on endpoint(s) ep")
