"""Models: registration, centroids in both units, artifacts, import, assignments, deletion."""

from __future__ import annotations

import gzip
import io
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.engine import read_model_tar, write_model_tar
from service.engine.mxnet_format import read_model_state
from tests.helpers import (
    BLOBS_CSV,
    assert_error,
    deployed,
    run_worker_until_idle,
    trained_model,
    upload_csv,
    workshop_dataset,
)

SAGEMAKER_ARTIFACT = Path(__file__).resolve().parent.parent / "data" / "kmeans-k10-d2-model.tar.gz"


def import_model(
    client: TestClient, data: bytes, feature_names: str, name: str = "imported", expect: int = 201
) -> dict:  # type: ignore[type-arg]
    response = client.post(
        "/models/import",
        files={"file": ("model.tar.gz", data, "application/gzip")},
        data={"name": name, "feature_names": feature_names},
    )
    assert response.status_code == expect, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.mark.slow
def test_model_records_what_it_was_trained_with(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    workshop = workshop_dataset(client, sample_csv["crimes"], sample_csv["densities"])
    model = trained_model(client, workshop["id"], hyperparameters={"k": 10, "seed": 11})
    assert model["source"] == "training" and model["train_dataset_id"] == workshop["id"]
    assert model["key_column"] == "State" and model["k"] == 10 and model["feature_dim"] == 5
    assert model["hyperparameters"]["seed"] == 11 and model["seed"] == 11
    assert model["engine_version"] and model["recipe"] == workshop["recipe"]
    assert sum(model["cluster_sizes"]) == 50
    listed = client.get("/models").json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == model["id"]


def test_centroids_in_scaled_and_original_units(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    workshop = workshop_dataset(client, sample_csv["crimes"], sample_csv["densities"])
    model = trained_model(client, workshop["id"], hyperparameters={"k": 10, "seed": 11})
    body = client.get(f"/models/{model['id']}/centroids").json()
    scaled = np.array(body["centroids"])
    original = body["original_units"]
    assert original["feature_names"] == ["Murder", "Assault", "UrbanPop", "Rape", "DensityPerMile"]
    back = np.array(original["centroids"])
    np.testing.assert_allclose(back[:, :4], scaled[:, :4])
    np.testing.assert_allclose(back[:, 4], 0.6 + (scaled[:, 4] + 1) * (975.0 - 0.6) / 2)


def test_artifact_is_sagemaker_format_with_the_centroids(client: TestClient) -> None:
    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    model = trained_model(client, blobs["id"])
    response = client.get(f"/models/{model['id']}/artifact")
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        assert archive.getnames()[0] == "model_algo-1"
    centroids = read_model_tar(response.content)
    assert centroids.dtype == np.float32
    np.testing.assert_allclose(centroids, client.get(f"/models/{model['id']}/centroids").json()["centroids"])
    assert len(response.content) == model["artifact_size"]


def test_artifact_holds_the_state_member_like_sagemakers(client: TestClient) -> None:
    """model_algo-1 then state_<uuid4> (the K local centers and their weights), as SageMaker writes."""
    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    model = trained_model(client, blobs["id"])  # k = 3 on 60 rows: K = 30 local centers
    data = client.get(f"/models/{model['id']}/artifact").content
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = archive.getnames()
    assert len(names) == 2, names
    assert names[0] == "model_algo-1"
    assert re.fullmatch(r"state_[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", names[1])
    state = read_model_state(data)
    assert state is not None and state.centers.shape == (30, 2)
    assert state.weights.sum() == 30 + 60  # each center starts at 1, then each row counts once


def test_import_a_real_sagemaker_artifact_and_serve_it_locally(client: TestClient) -> None:
    data = SAGEMAKER_ARTIFACT.read_bytes()
    model = import_model(client, data, "f1,f2", name="from-sagemaker")
    assert model["source"] == "import" and model["k"] == 10 and model["feature_dim"] == 2
    assert model["recipe"] is None and model["train_dataset_id"] is None
    expected = read_model_tar(data)
    np.testing.assert_allclose(client.get(f"/models/{model['id']}/centroids").json()["centroids"], expected)
    assert client.get(f"/models/{model['id']}/artifact").content == data
    deployed(client, model["id"], "imported")
    rows = "\n".join(",".join(str(v) for v in row) for row in expected[:3]) + "\n"
    result = client.post("/endpoints/imported/invocations", content=rows, headers={"content-type": "text/csv"}).json()
    assert [p["closest_cluster"] for p in result["predictions"]] == [0.0, 1.0, 2.0]
    assert all(p["distance_to_cluster"] == pytest.approx(0, abs=1e-4) for p in result["predictions"])


def test_import_a_legacy_mxnet_model(client: TestClient) -> None:
    """Old MXNet wrote arrays without a magic: u32 ndim, u32 dims, context, type flag, data."""
    centers = np.array([[0.5, -1.0], [3.0, 4.0], [10.0, 10.0]], "<f4")
    payload = (
        struct.pack("<QQQ", 0x112, 0, 1)
        + struct.pack("<3I", 2, *centers.shape)
        + struct.pack("<iii", 1, 0, 0)
        + centers.tobytes()
        + struct.pack("<Q", 0)
    )
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        info = tarfile.TarInfo("model_algo-1")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    model = import_model(client, gzip.compress(out.getvalue()), "x,y", name="legacy")
    assert model["k"] == 3 and model["feature_dim"] == 2
    np.testing.assert_array_equal(client.get(f"/models/{model['id']}/centroids").json()["centroids"], centers)


def test_import_accepts_json_feature_names(client: TestClient) -> None:
    model = import_model(client, write_model_tar(np.eye(3, dtype=np.float32)), '["a", "b", "c"]')
    assert model["feature_names"] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("data", "names", "fragment"),
    [
        (b"not a tarball", "a,b", "not a usable SageMaker KMeans model.tar.gz"),
        (SAGEMAKER_ARTIFACT.read_bytes()[:200], "a,b", "not a usable"),
        (SAGEMAKER_ARTIFACT.read_bytes(), "a,b,c", "2 features but 3 feature names"),
        (SAGEMAKER_ARTIFACT.read_bytes(), "a,a", "duplicate column names"),
    ],
)
def test_bad_imports_are_refused(client: TestClient, data: bytes, names: str, fragment: str) -> None:
    response = client.post(
        "/models/import", files={"file": ("m.tar.gz", data)}, data={"name": "x", "feature_names": names}
    )
    assert_error(response, 400, "invalid_input", fragment)
    assert client.get("/models").json()["total"] == 0


def test_import_needs_multipart_with_fields(client: TestClient) -> None:
    assert_error(client.post("/models/import", json={"name": "x"}), 415, "unsupported_media_type")
    assert_error(
        client.post("/models/import", files={"file": ("m", b"x")}, data={"name": "x"}), 422, "validation_error"
    )


def test_assignments_map_keys_to_clusters(client: TestClient) -> None:
    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    model = trained_model(client, blobs["id"])
    everything = client.get(f"/models/{model['id']}/assignments").json()
    assert len(everything["clusters"]) == 60 and everything["key_column"] == "id"
    assert everything["clusters"]["a0"] == everything["clusters"]["a19"] != everything["clusters"]["b0"]
    assert sorted(everything["counts"].values()) == [20, 20, 20]
    cluster = everything["clusters"]["c3"]
    only = client.get(f"/models/{model['id']}/assignments", params={"cluster": cluster}).json()
    assert set(only["clusters"]) == {f"c{i}" for i in range(20)}
    assert only["counts"] == {str(cluster): 20}
    assert all(d < 1 for d in only["distances"].values())
    assert_error(
        client.get(f"/models/{model['id']}/assignments", params={"cluster": 3}), 400, "invalid_input", "between 0 and 2"
    )


@pytest.mark.slow
def test_delete_is_refused_while_deployed(client: TestClient) -> None:
    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    model = trained_model(client, blobs["id"])
    deployed(client, model["id"])
    error = assert_error(client.delete(f"/models/{model['id']}"), 409, "conflict", "deployed")
    assert error["details"]["endpoints"] == ["ep"]
    assert_error(client.delete(f"/datasets/{blobs['id']}"), 409, "conflict", "model")
    assert client.delete("/endpoints/ep").status_code == 202
    run_worker_until_idle(client.app)
    assert client.delete(f"/models/{model['id']}").status_code == 204
    assert_error(client.get(f"/models/{model['id']}"), 404, "not_found")
    assert client.get("/training-jobs/job").json()["model_id"] is None
    assert_error(client.get(f"/models/{model['id']}/artifact"), 404, "not_found")


def test_listing_and_description_carry_no_centroids(client: TestClient) -> None:
    """Issue 16 finding 3: centroids only come from `/centroids`; `cluster_sizes` has k entries."""
    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    model = trained_model(client, blobs["id"])
    listed = client.get("/models").json()["items"][0]
    described = client.get(f"/models/{model['id']}").json()
    for body in (listed, described):
        assert "centroids" not in body and len(body["cluster_sizes"]) == body["k"] == 3
    assert len(client.get(f"/models/{model['id']}/centroids").json()["centroids"]) == 3
    assert client.get("/models", params={"name": "job"}).json()["total"] == 1
    assert client.get("/models", params={"name": "other"}).json() == {"items": [], "total": 0, "offset": 0, "limit": 50}


def test_import_above_the_k_ceiling_is_refused(client: TestClient) -> None:
    """CENTROID_MAX_K (default 10,000): one more centroid is a 400 naming the setting."""
    error = import_model(client, write_model_tar(np.zeros((10_001, 1))), "x", expect=400)["error"]
    assert error["code"] == "invalid_input" and "CENTROID_MAX_K" in error["message"]
    assert error["details"] == {"k": 10_001, "limit": 10_000}
    assert import_model(client, write_model_tar(np.zeros((10_000, 1))), "x")["k"] == 10_000


def test_model_listings_carry_neither_centroids_nor_recipes(client: TestClient, sample_csv: dict[str, bytes]) -> None:
    from tests.helpers import workshop_dataset

    workshop = workshop_dataset(client, sample_csv["crimes"], sample_csv["densities"])
    model = trained_model(client, workshop["id"])
    assert client.get(f"/models/{model['id']}").json()["recipe"] is not None
    (item,) = client.get("/models").json()["items"]
    assert item["id"] == model["id"] and "recipe" not in item and "centroids" not in item


def test_a_json_number_too_long_to_read_is_a_400(client: TestClient) -> None:
    body = '{"name": "j", "train_dataset_id": "ds-x", "hyperparameters": {"k": ' + "9" * 5000 + "}}"
    response = client.post("/training-jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422), response.text


# --- metric names (issue 13, part 3) --------------------------------------------------------------


def test_models_report_metrics_under_sagemaker_names_with_the_full_pass_figure_of_its_own(client: TestClient) -> None:
    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    model = trained_model(client, blobs["id"], hyperparameters={"k": 3, "seed": 5, "eval_metrics": '["ssd","msd"]'})
    assert set(model["metrics"]) == {"train:msd", "train:msd_full_pass", "train:ssd_full_pass"}
    # the full pass: every training row against the model's centroids (numpy as the oracle)
    features = np.array([[float(v) for v in line.split(",")[1:3]] for line in BLOBS_CSV.decode().splitlines()[1:]])
    centroids = np.array(client.get(f"/models/{model['id']}/centroids").json()["centroids"])
    squared = ((features[:, None, :] - centroids[None]) ** 2).sum(axis=2).min(axis=1)
    assert model["metrics"]["train:msd_full_pass"] == pytest.approx(squared.mean(), rel=1e-9)
    assert model["metrics"]["train:ssd_full_pass"] == pytest.approx(squared.sum(), rel=1e-9)
    # SageMaker's train:msd comes from the reduction of the local centers: smaller than the pass
    assert 0 <= model["metrics"]["train:msd"] < model["metrics"]["train:msd_full_pass"]


def test_metrics_stored_under_the_old_names_are_shown_under_the_new_ones(client: TestClient) -> None:
    from sqlalchemy import update

    from service.db.tables import ModelTable

    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    local = trained_model(client, blobs["id"], name="old-local")
    remote = trained_model(client, blobs["id"], name="old-sagemaker")
    old_local = {"train_msd": 0.25, "train_ssd": 15.0, "test_msd": 0.5, "test_ssd": 1.5}
    old_sagemaker = {"train_msd": 0.04, "test_msd": 0.05, "test_ssd": 0.2, "train_throughput": 9.0}
    with client.app.state.centroid.database.session() as session:  # type: ignore[attr-defined]
        session.execute(update(ModelTable).where(ModelTable.id == local["id"]).values(metrics=old_local))
        session.execute(  # as the SageMaker backend registered models before: no engine version
            update(ModelTable)
            .where(ModelTable.id == remote["id"])
            .values(metrics=old_sagemaker, engine_version=None, cluster_sizes=None)
        )
        session.commit()
    expected = {
        local["id"]: {"train:msd_full_pass": 0.25, "train:ssd_full_pass": 15.0, "test:msd": 0.5, "test:ssd": 1.5},
        remote["id"]: {"train:msd": 0.04, "test:msd": 0.05, "test:ssd": 0.2, "train:throughput": 9.0},
    }
    for model_id, metrics in expected.items():
        assert client.get(f"/models/{model_id}").json()["metrics"] == metrics
    listed = {item["id"]: item["metrics"] for item in client.get("/models").json()["items"]}
    assert listed == expected
