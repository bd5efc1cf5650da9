"""Sweeps over HTTP: create, progress, results, recommendation, register a k, deploy, predict;
validation, stop, delete, and the datasets a sweep holds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import silhouette_score

from service.engine import CenterIndex
from tests.helpers import BLOBS_CSV, assert_error, run_worker_until_idle, upload_csv, workshop_dataset


@pytest.fixture
def blobs(client: TestClient) -> dict[str, Any]:
    return upload_csv(client, "blobs", BLOBS_CSV, "id")


def start_sweep(client: TestClient, name: str, dataset_id: str, expect: int = 202, **fields: Any) -> dict[str, Any]:
    body = {"name": name, "train_dataset_id": dataset_id, "k": {"min": 2, "max": 6}, **fields}
    body.setdefault("hyperparameters", {"seed": 1, "mini_batch_size": 20})
    response = client.post("/sweeps", json=body)
    assert response.status_code == expect, response.text
    return response.json()  # type: ignore[no-any-return]


def test_a_sweep_trains_every_k_and_recommends_one(client: TestClient, blobs: dict[str, Any]) -> None:
    created = start_sweep(client, "s1", blobs["id"])
    assert created["status"] == "Pending" and created["k_values"] == [2, 3, 4, 5, 6]
    assert created["feature_columns"] == ["x", "y"] and created["rows_total"] == 120
    assert created["results"] is None and created["recommendation"] is None
    run_worker_until_idle(client.app)
    sweep = client.get("/sweeps/s1").json()
    assert sweep["status"] == "Completed", sweep
    assert sweep["rows_processed"] == sweep["rows_total"] == 120
    assert sweep["evaluated_on"] == "training" and sweep["sample_rows"] == 60
    assert [r["k"] for r in sweep["results"]] == [2, 3, 4, 5, 6]
    three = next(r for r in sweep["results"] if r["k"] == 3)
    assert sorted(three["cluster_sizes"]) == [20, 20, 20] and three["msd"] < 0.5
    assert sweep["recommendation"]["k"] == 3 and sweep["recommendation"]["reasons"]
    assert sweep["started_at"] <= sweep["ended_at"]
    listed = client.get("/sweeps", params={"status": "Completed"}).json()
    assert listed["total"] == 1 and listed["items"][0]["name"] == "s1"


def test_the_recommended_k_becomes_a_model_that_serves(client: TestClient, blobs: dict[str, Any]) -> None:
    start_sweep(client, "s1", blobs["id"])
    run_worker_until_idle(client.app)
    response = client.post("/sweeps/s1/models", json={})
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["source"] == "sweep" and model["k"] == 3 and model["name"] == "s1-k3"
    assert model["feature_names"] == ["x", "y"] and sorted(model["cluster_sizes"]) == [20, 20, 20]
    assert model["metrics"]["train:msd_full_pass"] < 0.5
    sweep = client.get("/sweeps/s1").json()
    assert next(r for r in sweep["results"] if r["k"] == 3)["model_id"] == model["id"]
    # the same k again: 409 naming the model; a k the sweep did not train: 400
    assert_error(client.post("/sweeps/s1/models", json={"k": 3}), 409, "conflict", model["id"])
    assert_error(client.post("/sweeps/s1/models", json={"k": 9}), 400, "invalid_input", "no k=9")
    other = client.post("/sweeps/s1/models", json={"k": 5, "name": "five"}).json()
    assert other["k"] == 5 and other["name"] == "five"
    # deploy and predict like any model
    assert client.post("/endpoints", json={"name": "ep", "model_id": model["id"]}).status_code == 202
    run_worker_until_idle(client.app)
    answer = client.post("/endpoints/ep/invocations", json={"instances": [[10.1, 0.1], [0.1, 10.1]]}).json()
    clusters = {int(p["closest_cluster"]) for p in answer["predictions"]}
    assert len(clusters) == 2
    centroids = np.asarray(client.get(f"/models/{model['id']}/centroids").json()["centroids"])
    expected = CenterIndex(centroids).nearest(np.array([[10.1, 0.1], [0.1, 10.1]]))
    assert [int(p["closest_cluster"]) for p in answer["predictions"]] == expected.tolist()


def test_the_workshop_sweep(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    dataset = workshop_dataset(client, sample_csv["crimes"], sample_csv["densities"])
    start_sweep(client, "states", dataset["id"], k={"min": 2, "max": 15}, hyperparameters={"seed": 1})
    run_worker_until_idle(client.app)
    sweep = client.get("/sweeps/states").json()
    assert sweep["status"] == "Completed" and len(sweep["results"]) == 14
    assert sweep["evaluated_on"] == "training" and sweep["sample_rows"] == 50
    # the registered model carries the dataset's recipe: raw rows in original units are predicted
    model = client.post("/sweeps/states/models", json={}).json()
    assert model["k"] == sweep["recommendation"]["k"]
    assert client.get(f"/models/{model['id']}/assignments").status_code == 200


def test_scores_are_scikit_learns(client: TestClient, blobs: dict[str, Any]) -> None:
    start_sweep(client, "s1", blobs["id"], k=[2, 3, 4])
    run_worker_until_idle(client.app)
    sweep = client.get("/sweeps/s1").json()
    rows = client.get(f"/datasets/{blobs['id']}/rows", params={"limit": 1000}).json()
    X = np.array([[row[1], row[2]] for row in rows["rows"]], dtype=np.float64)
    for result in sweep["results"]:
        model = client.post("/sweeps/s1/models", json={"k": result["k"]}).json()
        centroids = np.asarray(client.get(f"/models/{model['id']}/centroids").json()["centroids"])
        labels = CenterIndex(centroids).nearest(X)
        assert result["silhouette"] == pytest.approx(silhouette_score(X, labels), abs=1e-6)


def test_a_test_dataset_is_what_is_evaluated(client: TestClient, blobs: dict[str, Any]) -> None:
    test = upload_csv(client, "held-out", b"id,x,y\nq,0.2,0.1\nr,10.2,0.1\ns,0.1,10.2\nt,10.1,0.2\n", "id")
    start_sweep(client, "s1", blobs["id"], test_dataset_id=test["id"], k=[2, 3])
    run_worker_until_idle(client.app)
    sweep = client.get("/sweeps/s1").json()
    assert sweep["evaluated_on"] == "test" and sweep["rows_total"] == 60 + 4
    assert all(sum(r["cluster_sizes"]) == 4 for r in sweep["results"])
    model = client.post("/sweeps/s1/models", json={"k": 3}).json()
    assert "test:msd" in model["metrics"] and model["cluster_sizes"] is None


@pytest.mark.parametrize(
    ("fields", "status", "code", "fragment"),
    [
        ({"k": {"min": 5, "max": 2}}, 400, "invalid_input", "min must be <= max"),
        ({"k": [1, 2]}, 422, "validation_error", ""),
        ({"k": {"min": 2, "max": 200}}, 400, "invalid_input", "at most 100 ks"),
        ({"k": {"min": 2, "max": 20000}}, 422, "validation_error", ""),
        ({"k": {"min": 2, "max": 61}}, 400, "invalid_input", "k: must be <= the number of training rows (60)"),
        ({"hyperparameters": {"k": 3}}, 422, "validation_error", ""),
        ({"hyperparameters": {"init_method": "best"}}, 400, "invalid_input", "init_method"),
        ({"feature_columns": ["x", "label"]}, 400, "invalid_input", "not numeric"),
        ({"backend": "sagemaker"}, 409, "not_configured", "CENTROID_S3_BUCKET"),
        ({"backend": "elsewhere"}, 422, "validation_error", ""),
        ({"sample_size": 10}, 422, "validation_error", ""),
        ({"train_dataset_id": "ds-nope"}, 404, "not_found", "ds-nope"),
        ({"name": "bad name!"}, 422, "validation_error", ""),
    ],
)
def test_bad_sweeps_create_nothing(
    client: TestClient, blobs: dict[str, Any], fields: dict[str, Any], status: int, code: str, fragment: str
) -> None:
    body = {"name": "s1", "train_dataset_id": blobs["id"], "k": {"min": 2, "max": 4}, **fields}
    assert_error(client.post("/sweeps", json=body), status, code, fragment)
    assert client.get("/sweeps").json()["total"] == 0


def test_names_are_unique_and_models_need_a_completed_sweep(client: TestClient, blobs: dict[str, Any]) -> None:
    start_sweep(client, "s1", blobs["id"])
    assert_error(
        client.post("/sweeps", json={"name": "s1", "train_dataset_id": blobs["id"], "k": [2]}), 409, "conflict"
    )
    assert_error(client.post("/sweeps/s1/models", json={}), 409, "conflict", "Completed sweep")
    assert_error(client.get("/sweeps/nope"), 404, "not_found", "nope")


def test_stop_and_delete(client: TestClient, blobs: dict[str, Any]) -> None:
    start_sweep(client, "s1", blobs["id"])
    stopped = client.post("/sweeps/s1/stop").json()
    assert stopped["status"] == "Stopped"
    assert_error(client.post("/sweeps/s1/stop"), 409, "conflict", "already Stopped")
    run_worker_until_idle(client.app)
    assert client.get("/sweeps/s1").json()["status"] == "Stopped"
    # a sweep holds its dataset until it is deleted
    assert_error(client.delete(f"/datasets/{blobs['id']}"), 409, "conflict", "sweep 's1'")
    assert client.delete("/sweeps/s1").status_code == 204
    assert_error(client.get("/sweeps/s1"), 404, "not_found")
    assert client.delete(f"/datasets/{blobs['id']}").status_code == 204


def test_a_running_sweep_cannot_be_deleted(client: TestClient, blobs: dict[str, Any]) -> None:
    start_sweep(client, "s1", blobs["id"])
    assert_error(client.delete("/sweeps/s1"), 409, "conflict", "only a Completed, Failed or Stopped sweep")


def test_a_dataset_deleted_mid_creation_is_a_409(
    client: TestClient, blobs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dataset's file gone while the features are checked (a concurrent DELETE on SQLite):
    409 naming the dataset, not a 500, and nothing created."""
    from service.jobs.service import JobService

    def gone(self: JobService, *args: Any) -> None:
        raise FileNotFoundError("the dataset's file")

    monkeypatch.setattr(JobService, "check_features", gone)
    response = client.post("/sweeps", json={"name": "s1", "train_dataset_id": blobs["id"], "k": [2, 3]})
    error = assert_error(response, 409, "conflict", "was deleted while sweep 's1' was being created")
    assert error["details"] == {"dataset_id": blobs["id"], "reason": "dataset_deleted"}
    assert client.get("/sweeps").json()["total"] == 0


def test_listings_and_descriptions_never_read_the_trained_state(client: TestClient, blobs: dict[str, Any]) -> None:
    """Each k's centroids and the local centers grow with k x d; only registering a model reads them."""
    from tests.reliability.test_bounded_models import statements

    start_sweep(client, "s1", blobs["id"])
    run_worker_until_idle(client.app)
    with statements(client) as seen:
        assert client.get("/sweeps").status_code == 200
        assert client.get("/sweeps/s1").status_code == 200
    reads = [s for s in seen if "FROM sweeps" in s]
    assert reads and not any("trained_state" in s for s in reads), reads
    with statements(client) as seen:
        assert client.post("/sweeps/s1/models", json={}).status_code == 201
    assert any("trained_state" in s for s in seen)
