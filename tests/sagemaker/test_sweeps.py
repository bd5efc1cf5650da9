"""Sweeps on the sagemaker backend: one training job per k against moto playing SageMaker, then
every k evaluated by the worker, with the same result shape as a local sweep."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sklearn.cluster import KMeans
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from service.backends.sagemaker.naming import MAX_NAME, sweep_training_job_name
from service.engine import write_model_tar
from service.main import create_app
from service.settings import Settings
from tests.helpers import BLOBS_CSV, deployed, run_worker_until_idle, upload_csv
from tests.sagemaker.conftest import BUCKET, PREFIX, FakeSageMaker, backend_of, poll, record
from workers.worker import Worker

TEST_CSV = b"id,x,y\n" + b"".join(
    f"t{i},{[0.3, 10.2, 0.1][i % 3] + 0.05 * (i % 4)},{[0.2, 0.1, 10.1][i % 3] - 0.03 * (i % 5)}\n".encode()
    for i in range(30)
)


def features(csv: bytes) -> np.ndarray:
    return pd.read_csv(io.BytesIO(csv))[["x", "y"]].to_numpy(dtype=np.float64)


def trained(k: int) -> np.ndarray:
    """The centers SageMaker 'trains' for k: scikit-learn's on the training data (float32, as stored)."""
    return KMeans(k, n_init=4, random_state=0).fit(features(BLOBS_CSV)).cluster_centers_.astype(np.float32)


@pytest.fixture
def sweep_settings(sm_settings: Settings) -> Settings:
    return sm_settings.model_copy(update={"sweep_parallel_training_jobs": 2})


@pytest.fixture
def client(sweep_settings: Settings, aws: FakeSageMaker) -> Iterator[TestClient]:
    with TestClient(create_app(sweep_settings)) as test_client:
        yield test_client


@pytest.fixture
def sm_worker(client: TestClient) -> Worker:
    return Worker(client.app.state.centroid, worker_id="sm-sweeper")  # type: ignore[attr-defined]


def start(client: TestClient, name: str = "which-k", ks: Any = None, **fields: Any) -> dict[str, Any]:
    train = upload_csv(client, f"{name}-train", BLOBS_CSV, "id")
    body = {
        "name": name,
        "train_dataset_id": train["id"],
        "feature_columns": ["x", "y"],
        "k": ks or [2, 3, 4],
        "backend": "sagemaker",
        "hyperparameters": {"init_method": "kmeans++", "seed": 3},
        **fields,
    }
    response = client.post("/sweeps", json=body)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def view(client: TestClient, name: str = "which-k") -> dict[str, Any]:
    response = client.get(f"/sweeps/{name}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def statuses(sweep: dict[str, Any]) -> dict[int, str]:
    return {job["k"]: job["status"] for job in sweep["training_jobs"]}


def running(aws: FakeSageMaker, name: str) -> None:
    aws.set_training(name, "InProgress", "Training", [("Training", "Training in progress")])


def complete(aws: FakeSageMaker, name: str, centers: np.ndarray, billable: int, train_msd: float) -> None:
    aws.put_artifact(name, write_model_tar(centers))
    aws.set_training(
        name,
        "Completed",
        "Completed",
        [("Training", "Training in progress"), ("Completed", "Training job completed")],
        training_time_in_seconds=billable + 20,
        billable_time_in_seconds=billable,
        final_metric_data_list=[{"MetricName": "train:msd", "Value": train_msd, "Timestamp": 0}],
    )


def test_a_sweep_on_sagemaker_runs_one_training_job_per_k_then_evaluates_every_k(
    client: TestClient, aws: FakeSageMaker, sm_worker: Worker
) -> None:
    creates = record(backend_of(client).client("sagemaker"), "CreateTrainingJob")
    holdout = upload_csv(client, "holdout", TEST_CSV, "id")
    created = start(client, test_dataset_id=holdout["id"])
    assert (created["status"], created["backend"], created["rows_total"]) == ("Pending", "sagemaker", 30)

    poll(sm_worker)  # the data goes to S3 once; the first two ks are submitted (at most 2 at once)
    first = view(client)
    assert first["status"] == "InProgress"
    assert statuses(first) == {2: "InProgress", 3: "InProgress", 4: "Waiting"}
    assert [job["training_job_name"] for job in first["training_jobs"]] == ["which-k-k2", "which-k-k3", "which-k-k4"]
    assert "0 of 3 SageMaker training jobs (one per k) completed, 2 running, 1 waiting" in first["status_message"]
    assert aws.keys(f"{PREFIX}/sweeps/which-k/") == [
        f"{PREFIX}/sweeps/which-k/test/data.csv",
        f"{PREFIX}/sweeps/which-k/train/data.csv",
    ]
    assert [request["TrainingJobName"] for request in creates.params] == ["which-k-k2", "which-k-k3"]
    for request, k in zip(creates.params, (2, 3), strict=True):
        assert request["HyperParameters"]["k"] == str(k) and request["HyperParameters"]["feature_dim"] == "2"
        assert request["HyperParameters"]["init_method"] == "kmeans++"
        uris = [channel["DataSource"]["S3DataSource"]["S3Uri"] for channel in request["InputDataConfig"]]
        assert uris == [f"s3://{BUCKET}/{PREFIX}/sweeps/which-k/train/", f"s3://{BUCKET}/{PREFIX}/sweeps/which-k/test/"]
        assert (
            request["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/{PREFIX}/{request['TrainingJobName']}/output"
        )
    running(aws, "which-k-k2")
    running(aws, "which-k-k3")

    poll(sm_worker)  # both still training: nothing more is submitted
    assert statuses(view(client)) == {2: "InProgress", 3: "InProgress", 4: "Waiting"} and len(creates.params) == 2

    centers = {k: trained(k) for k in (2, 3, 4)}
    complete(aws, "which-k-k2", centers[2], billable=100, train_msd=25.5)
    poll(sm_worker)  # k=2 is done: k=4 takes its place
    assert statuses(view(client)) == {2: "Completed", 3: "InProgress", 4: "InProgress"}
    assert [request["TrainingJobName"] for request in creates.params][-1] == "which-k-k4"
    assert view(client)["billable_seconds"] == 100

    complete(aws, "which-k-k3", centers[3], billable=110, train_msd=0.02)
    complete(aws, "which-k-k4", centers[4], billable=120, train_msd=0.015)
    poll(sm_worker)  # every job completed: the worker evaluates every k on the holdout in one pass
    done = view(client)
    assert done["status"] == "Completed", done
    assert done["status_message"] == (
        "sweep completed: 3 SageMaker training jobs (one per k), 330 billable seconds in all"
    )
    assert (done["evaluated_on"], done["sample_rows"], done["rows_processed"]) == ("test", 30, 30)
    assert done["billable_seconds"] == 330 and set(statuses(done).values()) == {"Completed"}
    assert len(creates.params) == 3  # never a job twice

    holdout_rows = features(TEST_CSV)
    for result in done["results"]:
        k, c = result["k"], centers[result["k"]].astype(np.float64)
        squared = ((holdout_rows[:, None, :] - c[None]) ** 2).sum(axis=2)
        labels = squared.argmin(axis=1)
        assert result["msd"] == pytest.approx(squared.min(axis=1).mean(), rel=1e-9)
        assert result["ssd"] == pytest.approx(squared.min(axis=1).sum(), rel=1e-9)
        assert result["cluster_sizes"] == np.bincount(labels, minlength=k).tolist()
        assert result["train_msd"] == {2: 25.5, 3: 0.02, 4: 0.015}[k]  # SageMaker's own figure
        assert result["silhouette"] == pytest.approx(silhouette_score(holdout_rows, labels), abs=1e-9)
        assert result["davies_bouldin"] == pytest.approx(davies_bouldin_score(holdout_rows, labels), rel=1e-9)
        assert result["calinski_harabasz"] == pytest.approx(calinski_harabasz_score(holdout_rows, labels), rel=1e-9)
    assert done["recommendation"]["k"] == 3

    # the recommended k becomes a model: SageMaker's artifact, byte for byte, served locally
    response = client.post("/sweeps/which-k/models", json={})
    assert response.status_code == 201, response.text
    model = response.json()
    assert (model["k"], model["source"], model["seed"]) == (3, "sweep", None)
    assert model["metrics"]["train:msd"] == 0.02 and model["metrics"]["test:msd"] == pytest.approx(
        done["results"][1]["msd"]
    )
    assert client.get(f"/models/{model['id']}/artifact").content == write_model_tar(centers[3])
    deployed(client, model["id"], name="which-k-ep")
    answer = client.post(
        "/endpoints/which-k-ep/invocations", content="10.1,0.2\n0.2,9.9", headers={"content-type": "text/csv"}
    ).json()
    expected = (
        ((np.array([[10.1, 0.2], [0.2, 9.9]])[:, None, :] - centers[3].astype(np.float64)[None]) ** 2)
        .sum(axis=2)
        .argmin(axis=1)
    )
    assert [p["closest_cluster"] for p in answer["predictions"]] == expected.tolist()


def test_the_result_has_the_shape_of_a_local_sweep(client: TestClient, aws: FakeSageMaker, sm_worker: Worker) -> None:
    start(client, ks=[2, 3])
    poll(sm_worker)
    for k in (2, 3):
        complete(aws, f"which-k-k{k}", trained(k), billable=50, train_msd=1.0)
    poll(sm_worker)
    remote = view(client)
    train = upload_csv(client, "local-train", BLOBS_CSV, "id")
    body = {"name": "local-k", "train_dataset_id": train["id"], "feature_columns": ["x", "y"], "k": [2, 3]}
    assert client.post("/sweeps", json=body).status_code == 202
    run_worker_until_idle(client.app)
    local = view(client, "local-k")
    assert (remote["status"], local["status"]) == ("Completed", "Completed")
    assert remote.keys() == local.keys()
    assert [r.keys() for r in remote["results"]] == [r.keys() for r in local["results"]]
    assert remote["recommendation"].keys() == local["recommendation"].keys()
    assert (local["training_jobs"], local["billable_seconds"]) == (None, None)
    assert remote["evaluated_on"] == local["evaluated_on"] == "training"


def test_a_failed_job_fails_the_sweep_and_stops_the_others(
    client: TestClient, aws: FakeSageMaker, sm_worker: Worker
) -> None:
    stops = record(backend_of(client).client("sagemaker"), "StopTrainingJob")
    start(client)
    poll(sm_worker)
    running(aws, "which-k-k2")
    aws.set_training(
        "which-k-k3", "Failed", "Failed", [("Failed", "AlgorithmError")], failure_reason="ClientError: bad"
    )
    poll(sm_worker)
    failed = view(client)
    assert failed["status"] == "Failed"
    assert failed["failure_reason"] == (
        "k=3: SageMaker training job which-k-k3 failed: ClientError: bad; the sweep's other training jobs were asked "
        "to stop"
    )
    assert stops.params == [{"TrainingJobName": "which-k-k2"}]  # k=4 was never submitted
    assert statuses(failed) == {2: "InProgress", 3: "Failed", 4: "Waiting"}
    assert failed["results"] is None
    poll(sm_worker)  # a failed sweep is not polled again
    assert "which-k-k4" not in aws.state.training_jobs


def test_stop_stops_the_jobs_in_flight_and_submits_no_more(
    client: TestClient, aws: FakeSageMaker, sm_worker: Worker
) -> None:
    stops = record(backend_of(client).client("sagemaker"), "StopTrainingJob")
    start(client)
    poll(sm_worker)
    running(aws, "which-k-k2")
    running(aws, "which-k-k3")
    response = client.post("/sweeps/which-k/stop")
    assert response.status_code == 200 and response.json()["status"] == "Stopping", response.text

    poll(sm_worker)  # StopTrainingJob for both (moto does not implement it: SageMaker still says InProgress)
    assert sorted(p["TrainingJobName"] for p in stops.params) == ["which-k-k2", "which-k-k3"]
    stopping = view(client)
    assert stopping["status"] == "Stopping" and "waiting for SageMaker to stop" in stopping["status_message"]
    assert statuses(stopping)[4] == "Stopped"  # never submitted

    for k in (2, 3):
        aws.set_training(f"which-k-k{k}", "Stopped", "Stopped", [("Stopped", "Stopped")], billable_time_in_seconds=7)
    poll(sm_worker)
    stopped = view(client)
    assert stopped["status"] == "Stopped" and stopped["results"] is None
    assert stopped["billable_seconds"] == 14
    assert "which-k-k4" not in aws.state.training_jobs


def test_a_restarted_worker_resumes_the_sweep(client: TestClient, aws: FakeSageMaker, sm_worker: Worker) -> None:
    creates = record(backend_of(client).client("sagemaker"), "CreateTrainingJob")
    start(client, ks=[2, 3])
    poll(sm_worker)
    for k in (2, 3):
        complete(aws, f"which-k-k{k}", trained(k), billable=10, train_msd=1.0)
    another = Worker(client.app.state.centroid, worker_id="sm-sweeper-2")  # type: ignore[attr-defined]
    poll(another)
    assert view(client)["status"] == "Completed"
    assert len(creates.params) == 2


def test_a_long_sweep_name_gives_distinct_job_names_within_sagemakers_limit() -> None:
    long_a, long_b = "a" * 60 + "-one", "a" * 60 + "-two"
    names = {sweep_training_job_name(name, k) for name in (long_a, long_b) for k in (2, 99, 100)}
    assert len(names) == 6 and all(len(name) <= MAX_NAME for name in names)
    assert sweep_training_job_name("short", 7) == "short-k7"


def test_an_unusable_artifact_fails_the_sweep(client: TestClient, aws: FakeSageMaker, sm_worker: Worker) -> None:
    start(client, ks=[2, 3])
    poll(sm_worker)
    complete(aws, "which-k-k2", trained(2), billable=10, train_msd=1.0)
    complete(aws, "which-k-k3", trained(2), billable=10, train_msd=1.0)  # 2 centers where 3 were asked for
    poll(sm_worker)
    failed = view(client)
    assert failed["status"] == "Failed" and "k=3" in failed["failure_reason"]
    assert "holds (2, 2) centroids, expected (3, 2)" in failed["failure_reason"]
