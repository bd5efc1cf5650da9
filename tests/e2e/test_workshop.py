"""The whole workshop through HTTP only, against `centroid serve` as a new user runs it."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans

from service.engine import KMeansHyperparameters, WebScaleKMeans
from tests.conftest import SAMPLE_DATA
from tests.helpers import WORKSHOP_FEATURES, wait_for

HYPERPARAMETERS = {"k": 10, "init_method": "kmeans++", "local_lloyd_num_trials": 20, "seed": 7}


def upload(api: httpx.Client, name: str) -> str:
    with open(SAMPLE_DATA / f"{name}.csv", "rb") as handle:
        response = api.post(
            "/datasets", files={"file": (f"{name}.csv", handle, "text/csv")}, data={"name": name, "key_column": "State"}
        )
    assert response.status_code == 201, response.text
    return response.json()["id"]  # type: ignore[no-any-return]


def derive(api: httpx.Client, dataset_id: str, body: dict) -> dict:  # type: ignore[type-arg]
    response = api.post(f"/datasets/{dataset_id}/derive", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def test_the_workshop_end_to_end(api: httpx.Client) -> None:
    # Steps 5-8: load, scale density to [-1, 1], join on State, five features.
    crimes, densities = upload(api, "crimes"), upload(api, "densities")
    scaled = derive(
        api, densities, {"name": "densities-scaled", "steps": [{"op": "scale", "columns": ["DensityPerMile"]}]}
    )
    workshop = derive(
        api,
        crimes,
        {
            "name": "workshop",
            "steps": [{"op": "join", "dataset_id": scaled["id"]}, {"op": "select", "columns": WORKSHOP_FEATURES}],
        },
    )
    assert workshop["row_count"] == 50

    # Train k = 10 and wait for Completed.
    job = api.post(
        "/training-jobs",
        json={"name": "crime-k10", "train_dataset_id": workshop["id"], "hyperparameters": HYPERPARAMETERS},
    )
    assert job.status_code == 202, job.text
    done = wait_for(
        lambda: api.get("/training-jobs/crime-k10").json(), lambda j: j["status"] in ("Completed", "Failed")
    )
    assert done["status"] == "Completed", done
    model_id = done["model_id"]

    # Deploy and wait for InService.
    assert api.post("/endpoints", json={"name": "crime", "model_id": model_id}).status_code == 202
    wait_for(lambda: api.get("/endpoints/crime").json(), lambda e: e["status"] == "InService")

    # Predict all 50 states, sorted by cluster and distance, with the count per cluster.
    result = api.post("/endpoints/crime/predictions", json={"dataset_id": workshop["id"], "sort": "cluster,distance"})
    assert result.status_code == 200, result.text
    body = result.json()
    rows = body["predictions"]
    assert len(rows) == 50 and len({r["key"] for r in rows}) == 50
    assert rows == sorted(rows, key=lambda r: (r["closest_cluster"], r["distance_to_cluster"]))
    counts = pd.Series([r["closest_cluster"] for r in rows]).value_counts()
    assert body["cluster_counts"] == {str(c): int(counts.get(c, 0)) for c in range(10)}

    # Check against the returned centroids, the engine, and scikit-learn on the same matrix.
    table = pd.read_csv(io.StringIO(api.get(f"/datasets/{workshop['id']}/csv").text)).set_index("State")
    matrix = table[WORKSHOP_FEATURES].to_numpy(dtype=np.float64)
    centroids = np.array(api.get(f"/models/{model_id}/centroids").json()["centroids"])
    by_state = {r["key"]: r for r in rows}
    distances = np.linalg.norm(matrix[:, None, :] - centroids[None, :, :], axis=2)
    for state, row_distances in zip(table.index, distances, strict=True):
        assert by_state[state]["closest_cluster"] == int(np.argmin(row_distances))
        assert by_state[state]["distance_to_cluster"] == pytest.approx(row_distances.min(), rel=1e-6)

    engine = WebScaleKMeans.from_hyperparameters(
        KMeansHyperparameters.from_mapping({**HYPERPARAMETERS, "feature_dim": 5})
    ).fit(matrix)
    np.testing.assert_array_equal(engine.cluster_centers_, centroids.astype(np.float32))

    msd = float(np.mean(np.min(distances, axis=1) ** 2))
    model = api.get(f"/models/{model_id}").json()
    assert model["metrics"]["train:msd_full_pass"] == pytest.approx(msd, rel=1e-5)
    sklearn_msd = KMeans(n_clusters=10, n_init=10, random_state=0).fit(matrix).inertia_ / len(matrix)
    assert msd <= 1.02 * sklearn_msd, (msd, sklearn_msd)

    # The SageMaker-style contract gives the same answers for the raw feature rows.
    csv_rows = "\n".join(",".join(repr(float(v)) for v in row) for row in matrix)
    invoked = api.post("/endpoints/crime/invocations", content=csv_rows, headers={"Content-Type": "text/csv"}).json()
    assert [p["closest_cluster"] for p in invoked["predictions"]] == [
        float(by_state[s]["closest_cluster"]) for s in table.index
    ]

    # Other services: the key -> cluster map.
    assignments = api.get(f"/models/{model_id}/assignments").json()
    assert assignments["clusters"] == {s: r["closest_cluster"] for s, r in by_state.items()}
