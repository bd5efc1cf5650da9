"""SageMaker training jobs through the API and the worker, against moto playing SageMaker."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from service.backends.sagemaker import s3 as sagemaker_module
from service.engine import predict, write_model_tar
from service.main import create_app
from service.settings import Settings
from tests.helpers import BLOBS_CSV, assert_error, deployed, upload_csv, wait_for
from tests.sagemaker.conftest import (
    BUCKET,
    KMEANS_IMAGE_US_EAST_1,
    PREFIX,
    ROLE,
    FakeSageMaker,
    backend_of,
    inject_errors,
    poll,
    record,
)
from workers.worker import Worker

CENTERS = np.array([[0.2, 0.1], [10.2, 0.1], [0.2, 10.1]])
TEST_CSV = b"id,x,y\nt0,0.5,0.5\nt1,9.5,0.5\nt2,0.5,9.5\nt3,1.25,0.75\n"


def blob_features() -> np.ndarray:
    return pd.read_csv(io.BytesIO(BLOBS_CSV))[["x", "y"]].to_numpy()


def submit(client: TestClient, name: str = "sm-job", expect: int = 202, **fields: object) -> dict:  # type: ignore[type-arg]
    dataset = upload_csv(client, f"{name}-data", BLOBS_CSV, "id")
    body = {
        "name": name,
        "train_dataset_id": dataset["id"],
        "backend": "sagemaker",
        "hyperparameters": {"k": 3, "init_method": "kmeans++", "eval_metrics": ["msd", "ssd"]},
        **fields,
    }
    response = client.post("/training-jobs", json=body)
    assert response.status_code == expect, response.text
    return response.json()  # type: ignore[no-any-return]


def job(client: TestClient, name: str = "sm-job") -> dict:  # type: ignore[type-arg]
    return client.get(f"/training-jobs/{name}").json()  # type: ignore[no-any-return]


def complete(aws: FakeSageMaker, name: str = "sm-job", artifact: bytes | None = None) -> None:
    """SageMaker finishes: writes model.tar.gz and reports times and final metrics."""
    aws.put_artifact(name, write_model_tar(CENTERS) if artifact is None else artifact)
    aws.set_training(
        name,
        "Completed",
        "Completed",
        [
            ("Starting", "Preparing the instances for training"),
            ("Training", "Training image download completed"),
            ("Uploading", "Uploading generated training model"),
            ("Completed", "Training job completed"),
        ],
        training_time_in_seconds=187,
        billable_time_in_seconds=161,
        final_metric_data_list=[
            {"MetricName": "train:msd", "Value": 0.0433, "Timestamp": 0},
            {"MetricName": "test:msd", "Value": 0.0512, "Timestamp": 0},
            {"MetricName": "test:ssd", "Value": 0.2048, "Timestamp": 0},
        ],
    )


def test_training_on_sagemaker_end_to_end(sm_client: TestClient, aws: FakeSageMaker, worker: Worker) -> None:
    create_calls = record(backend_of(sm_client).client("sagemaker"), "CreateTrainingJob")
    test_set = upload_csv(sm_client, "holdout", TEST_CSV, "id")
    created = submit(
        sm_client,
        test_dataset_id=test_set["id"],
        resource_config={"instance_type": "ml.m5.large", "max_runtime_seconds": 3600},
    )
    assert created["status"] == "Pending" and created["backend"] == "sagemaker"

    poll(worker)  # submits: data to S3, then CreateTrainingJob
    submitted = job(sm_client)
    assert (submitted["status"], submitted["secondary_status"]) == ("InProgress", "Starting")
    assert submitted["remote"]["training_job_arn"].endswith(":training-job/sm-job")

    # the data: headerless CSV of exactly the feature columns, under <prefix>/<job>/train|test/
    assert aws.keys(f"{PREFIX}/sm-job/") == [f"{PREFIX}/sm-job/test/data.csv", f"{PREFIX}/sm-job/train/data.csv"]
    train_csv = aws.get(f"{PREFIX}/sm-job/train/data.csv").decode()
    assert train_csv.splitlines()[:2] == ["0,0", "0.1,0.1"]
    np.testing.assert_array_equal(np.loadtxt(io.StringIO(train_csv), delimiter=","), blob_features())
    test_csv = aws.get(f"{PREFIX}/sm-job/test/data.csv").decode()
    assert test_csv == "0.5,0.5\n9.5,0.5\n0.5,9.5\n1.25,0.75\n"

    # the request, exactly as Centroid sent it
    assert len(create_calls.params) == 1
    request = create_calls.params[0]
    channel = {
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3DataDistributionType": "ShardedByS3Key",
                "S3Uri": f"s3://{BUCKET}/{PREFIX}/sm-job/train/",
            }
        },
        "ChannelName": "train",
        "ContentType": "text/csv;label_size=0",
        "CompressionType": "None",
    }
    test_channel = {
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3DataDistributionType": "FullyReplicated",
                "S3Uri": f"s3://{BUCKET}/{PREFIX}/sm-job/test/",
            }
        },
        "ChannelName": "test",
        "ContentType": "text/csv;label_size=0",
        "CompressionType": "None",
    }
    assert request == {
        "TrainingJobName": "sm-job",
        "AlgorithmSpecification": {"TrainingImage": KMEANS_IMAGE_US_EAST_1, "TrainingInputMode": "File"},
        "RoleArn": ROLE,
        "HyperParameters": {
            "k": "3",
            "feature_dim": "2",
            "mini_batch_size": "5000",
            "epochs": "1",
            "init_method": "kmeans++",
            "extra_center_factor": "auto",
            "local_lloyd_max_iter": "300",
            "local_lloyd_tol": "0.0001",
            "local_lloyd_init_method": "kmeans++",
            "local_lloyd_num_trials": "auto",
            "half_life_time_size": "0",
            "eval_metrics": '["msd", "ssd"]',
        },
        "InputDataConfig": [channel, test_channel],
        "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/{PREFIX}/sm-job/output"},
        "ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 30},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        "Tags": [{"Key": "centroid:training-job", "Value": "sm-job"}],
    }
    # ... and as SageMaker (moto) received it
    stored = aws.training_job("sm-job")
    assert stored.hyper_parameters == request["HyperParameters"] and stored.role_arn == ROLE
    assert [c["ChannelName"] for c in stored.input_data_config] == ["train", "test"]

    # SageMaker is training: the job mirrors status, secondary status and its transitions
    aws.set_training(
        "sm-job",
        "InProgress",
        "Training",
        [
            ("Starting", "Preparing the instances for training"),
            ("Downloading", "Downloading input data"),
            ("Training", "Training image download completed. Training in progress."),
        ],
    )
    poll(worker)
    running = job(sm_client)
    assert (running["status"], running["secondary_status"]) == ("InProgress", "Training")
    assert running["status_message"] == "Training image download completed. Training in progress."
    assert [t["status"] for t in running["status_transitions"]] == ["Starting", "Downloading", "Training"]
    assert running["status_transitions"][0]["start_time"].startswith("2026-01-01T12:00:00")
    assert running["status_transitions"][0]["end_time"].startswith("2026-01-01T12:01:00")
    assert running["status_transitions"][-1]["end_time"] is None
    assert running["model_id"] is None

    complete(aws)
    poll(worker)
    done = job(sm_client)
    assert (done["status"], done["secondary_status"]) == ("Completed", "Completed")
    assert (done["training_seconds"], done["billable_seconds"]) == (187, 161)
    assert [t["status"] for t in done["status_transitions"]][-1] == "Completed"
    assert done["remote"]["model_artifact_s3_uri"] == f"s3://{BUCKET}/{PREFIX}/sm-job/output/sm-job/output/model.tar.gz"
    assert len(create_calls.params) == 1  # polling never re-submits

    # the SageMaker artifact became a registered model with SageMaker's centroids and metrics
    model = sm_client.get(f"/models/{done['model_id']}").json()
    centroids = sm_client.get(f"/models/{model['id']}/centroids").json()["centroids"]
    np.testing.assert_array_equal(centroids, CENTERS.astype(np.float32))
    squared = np.min(((blob_features()[:, None, :] - CENTERS.astype(np.float32)[None]) ** 2).sum(axis=2), axis=1)
    assert model["metrics"] == {
        "train:msd": 0.0433,  # SageMaker's, as FinalMetricDataList reports it
        "train:msd_full_pass": pytest.approx(squared.mean(), rel=1e-9),  # Centroid's pass over the data
        "train:ssd_full_pass": pytest.approx(squared.sum(), rel=1e-9),
        "test:msd": 0.0512,
        "test:ssd": 0.2048,
    }
    assert (model["k"], model["feature_names"], model["seed"], model["cluster_sizes"]) == (3, ["x", "y"], None, None)
    assert sm_client.get(f"/models/{model['id']}/artifact").content == write_model_tar(CENTERS)

    # ... and it serves on a local endpoint at no SageMaker cost
    deployed(sm_client, model["id"], name="local-ep")
    response = sm_client.post(
        "/endpoints/local-ep/invocations", content="9.9,0.3\n0.1,9.7", headers={"content-type": "text/csv"}
    )
    expected = predict(np.array([[9.9, 0.3], [0.1, 9.7]]), CENTERS.astype(np.float32).astype(np.float64))
    assert [p["closest_cluster"] for p in response.json()["predictions"]] == expected.closest_cluster.tolist() == [1, 2]


def test_polling_backs_off_up_to_the_setting(sm_client: TestClient, aws: FakeSageMaker) -> None:
    backend = backend_of(sm_client)
    backend.settings = backend.settings.model_copy(update={"remote_poll_seconds": 15.0})
    assert [backend._poll_delay(n) for n in range(5)] == [2.0, 4.0, 8.0, 15.0, 15.0]


def test_role_missing_is_a_409_at_creation(settings: Settings, aws: FakeSageMaker, moto_url: str) -> None:
    partial = settings.model_copy(update={"aws_region": "us-east-1", "s3_bucket": BUCKET, "aws_endpoint_url": moto_url})
    with TestClient(create_app(partial)) as client:
        dataset = upload_csv(client, "blobs", BLOBS_CSV, "id")
        body = {"name": "j", "train_dataset_id": dataset["id"], "backend": "sagemaker", "hyperparameters": {"k": 3}}
        assert_error(
            client.post("/training-jobs", json=body),
            409,
            "not_configured",
            "backend 'sagemaker' is not configured: missing settings: CENTROID_SAGEMAKER_ROLE_ARN",
        )
        assert client.get("/training-jobs").json()["total"] == 0
    assert aws.state.training_jobs == {}


def test_bucket_missing_fails_the_job_with_a_clear_reason(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker
) -> None:
    aws.s3.delete_bucket(Bucket=BUCKET)
    submit(sm_client)
    poll(worker)
    failed = job(sm_client)
    assert (failed["status"], failed["secondary_status"]) == ("Failed", "Failed")
    assert failed["failure_reason"] == f"S3 bucket '{BUCKET}' does not exist (setting CENTROID_S3_BUCKET)"
    assert aws.state.training_jobs == {}
    assert not worker.run_once()  # nothing left to poll


def test_job_failed_in_sagemaker_mirrors_the_reason(sm_client: TestClient, aws: FakeSageMaker, worker: Worker) -> None:
    submit(sm_client)
    poll(worker)
    reason = "ClientError: Unable to read data channel 'train'. Requested content-type is 'text/csv'."
    aws.set_training(
        "sm-job",
        "Failed",
        "Failed",
        [("Starting", "Starting"), ("Failed", reason)],
        failure_reason=reason,
        training_time_in_seconds=12,
        billable_time_in_seconds=12,
    )
    poll(worker)
    failed = job(sm_client)
    assert (failed["status"], failed["failure_reason"], failed["billable_seconds"]) == ("Failed", reason, 12)
    assert failed["model_id"] is None and sm_client.get("/models").json()["total"] == 0


@pytest.mark.parametrize(
    ("artifact", "fragment"),
    [
        (None, "is missing"),
        (b"this is not a tarball", "is not a usable KMeans model.tar.gz"),
        (write_model_tar(np.ones((4, 2))), "holds (4, 2) centroids, expected (3, 2)"),
    ],
)
def test_unusable_artifact_fails_the_job(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, artifact: bytes | None, fragment: str
) -> None:
    submit(sm_client)
    poll(worker)
    aws.set_training("sm-job", "Completed", "Completed", [("Completed", "Training job completed")])
    if artifact is not None:
        aws.put_artifact("sm-job", artifact)
    poll(worker)
    failed = job(sm_client)
    assert failed["status"] == "Failed", failed
    assert fragment in failed["failure_reason"]
    assert f"s3://{BUCKET}/{PREFIX}/sm-job/output/sm-job/output/model.tar.gz" in failed["failure_reason"]
    assert failed["model_id"] is None and sm_client.get("/models").json()["total"] == 0


def test_throttling_is_retried_by_the_client(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, backoff_delays: list[float]
) -> None:
    client = backend_of(sm_client).client("sagemaker")
    submit(sm_client)
    poll(worker)
    aws.set_training("sm-job", "InProgress", "Training", [("Training", "Training in progress")])
    describes = record(client, "DescribeTrainingJob")
    throttled = inject_errors(client, "DescribeTrainingJob", 400, "ThrottlingException", times=3)
    poll(worker)
    assert throttled == [400, 400, 400] and describes.attempts == 4 and len(describes.params) == 1
    assert len(backoff_delays) == 3 and all(delay >= 0 for delay in backoff_delays)
    running = job(sm_client)
    assert (running["status"], running["secondary_status"]) == ("InProgress", "Training")
    assert "poll failed" not in (running["status_message"] or "")


def test_transient_errors_beyond_the_retries_are_retried_on_the_next_poll(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker
) -> None:
    client = backend_of(sm_client).client("sagemaker")
    submit(sm_client)
    poll(worker)
    aws.set_training("sm-job", "InProgress", "Training", [("Training", "Training in progress")])
    failures = inject_errors(
        client, "DescribeTrainingJob", 503, "ServiceUnavailable", times=8
    )  # every attempt of one call
    poll(worker)
    assert len(failures) == 8
    waiting = job(sm_client)
    assert waiting["status"] == "InProgress" and "will retry" in waiting["status_message"]
    complete(aws)
    poll(worker)
    assert job(sm_client)["status"] == "Completed"


def test_a_job_that_vanished_from_sagemaker_fails(sm_client: TestClient, aws: FakeSageMaker, worker: Worker) -> None:
    submit(sm_client)
    poll(worker)
    del aws.state.training_jobs["sm-job"]
    poll(worker)
    failed = job(sm_client)
    assert (
        failed["status"] == "Failed"
        and "the SageMaker training job 'sm-job' no longer exists" in failed["failure_reason"]
    )


def test_a_restarted_worker_resumes_polling(sm_client: TestClient, aws: FakeSageMaker) -> None:
    state = sm_client.app.state.centroid  # type: ignore[attr-defined]
    submit(sm_client)
    poll(Worker(state, worker_id="first"))
    aws.set_training("sm-job", "InProgress", "Training", [("Training", "Training in progress")])
    complete(aws)
    creates = record(backend_of(sm_client).client("sagemaker"), "CreateTrainingJob")
    poll(Worker(state, worker_id="second"))  # a new process: everything it knows comes from the database
    done = job(sm_client)
    assert done["status"] == "Completed" and done["model_id"] and creates.params == []


def test_a_worker_that_died_after_creating_adopts_the_job(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker
) -> None:
    client = backend_of(sm_client).client("sagemaker")

    def die(**_: object) -> None:
        raise RuntimeError("worker killed right after CreateTrainingJob")

    client.meta.events.register("after-call.sagemaker.CreateTrainingJob", die, unique_id="die")
    submit(sm_client)
    poll(worker)
    assert "sm-job" in aws.state.training_jobs and "training_job_arn" not in job(sm_client)["remote"]
    client.meta.events.unregister("after-call.sagemaker.CreateTrainingJob", unique_id="die")
    creates, puts = record(client, "CreateTrainingJob"), record(backend_of(sm_client).client("s3"), "PutObject")
    poll(worker)  # the job exists and writes to our output path: it is ours, adopt it as it is
    adopted = job(sm_client)
    assert adopted["status"] == "InProgress" and adopted["remote"]["training_job_arn"].endswith("/sm-job")
    assert creates.params == [] and puts.params == []  # no second job, no data rewritten under it
    complete(aws)
    poll(worker)
    assert job(sm_client)["status"] == "Completed"


def test_a_job_created_meanwhile_by_another_worker_is_adopted(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker
) -> None:
    client = backend_of(sm_client).client("sagemaker")

    def other_worker_creates_it_first(params: dict, **_: object) -> None:  # type: ignore[type-arg]
        if params["TrainingJobName"] not in aws.state.training_jobs:
            aws.sagemaker.create_training_job(**params)

    client.meta.events.register("provide-client-params.sagemaker.CreateTrainingJob", other_worker_creates_it_first)
    submit(sm_client)
    poll(worker)  # CreateTrainingJob -> ResourceInUse -> same output path -> adopted
    adopted = job(sm_client)
    assert adopted["status"] == "InProgress" and adopted["remote"]["training_job_arn"].endswith("/sm-job")
    assert len(aws.state.training_jobs) == 1


def test_a_foreign_job_with_the_same_name_is_not_mirrored(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker
) -> None:
    aws.sagemaker.create_training_job(
        TrainingJobName="sm-job",
        AlgorithmSpecification={"TrainingImage": KMEANS_IMAGE_US_EAST_1, "TrainingInputMode": "File"},
        RoleArn=ROLE,
        OutputDataConfig={"S3OutputPath": "s3://someone-else/output"},
        ResourceConfig={"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 1},
        StoppingCondition={"MaxRuntimeInSeconds": 60},
    )
    submit(sm_client)
    poll(worker)
    failed = job(sm_client)
    assert failed["status"] == "Failed" and "already exists" in failed["failure_reason"]
    assert "not started by this Centroid" in failed["failure_reason"]
    assert aws.keys() == []  # nothing uploaded for a job that cannot run


def test_stop_sends_stop_training_job_and_ends_stopped(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker
) -> None:
    client = backend_of(sm_client).client("sagemaker")
    stops = record(client, "StopTrainingJob")
    submit(sm_client)
    poll(worker)
    aws.set_training("sm-job", "InProgress", "Training", [("Training", "Training in progress")])
    response = sm_client.post("/training-jobs/sm-job/stop")
    assert response.status_code == 200 and response.json()["status"] == "Stopping", response.text

    poll(worker)  # StopTrainingJob is sent (moto answers 500: not implemented), polling goes on
    assert stops.params == [{"TrainingJobName": "sm-job"}] and stops.attempts >= 1
    stopping = job(sm_client)
    assert (stopping["status"], stopping["remote"]["stop_sent"]) == ("Stopping", True)

    poll(worker)  # SageMaker still says InProgress: the stop is sent again
    assert len(stops.params) == 2

    aws.set_training(
        "sm-job",
        "Stopped",
        "Stopped",
        [("Training", "Training in progress"), ("Stopped", "Stopped")],
        training_time_in_seconds=30,
        billable_time_in_seconds=30,
    )
    poll(worker)
    stopped = job(sm_client)
    assert (stopped["status"], stopped["secondary_status"], stopped["billable_seconds"]) == ("Stopped", "Stopped", 30)
    assert stopped["model_id"] is None


def test_stop_before_submission_never_reaches_sagemaker(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker
) -> None:
    submit(sm_client)
    assert sm_client.post("/training-jobs/sm-job/stop").json()["status"] == "Stopped"
    poll(worker)
    assert aws.state.training_jobs == {} and aws.keys() == []


def test_several_instances_get_one_shard_each_uploaded_in_parts(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moto.s3.models

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 64)
    monkeypatch.setattr(sagemaker_module, "PART_BYTES", 100)  # several multipart parts per shard
    monkeypatch.setattr(sagemaker_module, "READ_BATCH_ROWS", 7)
    parts = record(backend_of(sm_client).client("s3"), "UploadPart")
    submit(sm_client, resource_config={"instance_count": 2})
    poll(worker)
    keys = aws.keys(f"{PREFIX}/sm-job/train/")
    assert keys == [f"{PREFIX}/sm-job/train/data-00000.csv", f"{PREFIX}/sm-job/train/data-00001.csv"]
    shards = [np.loadtxt(io.StringIO(aws.get(key).decode()), delimiter=",") for key in keys]
    assert [len(shard) for shard in shards] == [30, 30]
    np.testing.assert_array_equal(np.vstack(shards), blob_features())
    assert len(parts.params) > 4
    assert aws.training_job("sm-job").resource_config["InstanceCount"] == 2


def test_unsupported_region_fails_clearly(sm_client: TestClient, aws: FakeSageMaker, worker: Worker) -> None:
    backend = backend_of(sm_client)
    backend.settings = backend.settings.model_copy(update={"aws_region": "xx-nowhere-1"})
    backend._clients.clear()
    submit(sm_client)
    poll(worker)
    failed = job(sm_client)
    assert failed["status"] == "Failed" and "no KMeans image for region 'xx-nowhere-1'" in failed["failure_reason"]


def test_hyperparameters_sent_are_json_strings(sm_client: TestClient, aws: FakeSageMaker, worker: Worker) -> None:
    submit(sm_client, hyperparameters={"k": "3", "mini_batch_size": 20, "epochs": "2", "seed": 9})
    poll(worker)
    sent = aws.training_job("sm-job").hyper_parameters
    assert all(isinstance(value, str) for value in sent.values())
    assert (sent["mini_batch_size"], sent["epochs"], json.loads(sent["eval_metrics"])) == ("20", "2", ["msd"])
    assert "seed" not in sent


# --- hyperparameter maps as SageMaker and its SDK write them; metric names (issue 13, part 3) ------

#: ``HyperParameters`` of DescribeTrainingJob for a job the SageMaker Python SDK launched, as the
#: KMeans container's "Final configuration" log shows it: every value a string.
SDK_MAP = {
    "k": "3",
    "feature_dim": "2",
    "init_method": "random",
    "mini_batch_size": "5000",
    "epochs": "1",
    "extra_center_factor": "auto",
    "local_lloyd_max_iter": "300",
    "local_lloyd_tol": "0.0001",
    "local_lloyd_init_method": "kmeans++",
    "local_lloyd_num_trials": "auto",
    "half_life_time_size": "0",
    "eval_metrics": '["msd"]',
    "force_dense": "True",
    "_disable_wait_to_read": "false",
    "_enable_profiler": "false",
    "_kvstore": "auto",
    "_log_level": "info",
    "_num_gpus": "auto",
    "_num_kv_servers": "1",
    "_num_slices": "1",
    "_tuning_objective_metric": "",
}


def test_an_sdk_hyperparameter_map_reaches_sagemaker_unchanged(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker
) -> None:
    create_calls = record(backend_of(sm_client).client("sagemaker"), "CreateTrainingJob")
    created = submit(sm_client, hyperparameters=SDK_MAP)
    assert created["ignored_hyperparameters"] == []  # SageMaker uses every one of them
    poll(worker)
    sent = create_calls.params[0]["HyperParameters"]
    assert sent == SDK_MAP  # every key, every value exactly as DescribeTrainingJob gave it
    assert aws.training_job("sm-job").hyper_parameters == SDK_MAP  # ... and as SageMaker received it


def test_the_seed_is_listed_as_ignored_on_sagemaker(sm_client: TestClient, aws: FakeSageMaker) -> None:
    created = submit(sm_client, hyperparameters={**SDK_MAP, "seed": "5"})
    assert created["ignored_hyperparameters"] == ["seed"]


def test_an_unknown_name_in_a_sagemaker_map_is_still_refused(sm_client: TestClient, aws: FakeSageMaker) -> None:
    dataset = upload_csv(sm_client, "blobs", BLOBS_CSV, "id")
    body = {
        "name": "sm-job",
        "train_dataset_id": dataset["id"],
        "backend": "sagemaker",
        "hyperparameters": {**SDK_MAP, "_num_cpus": "4"},
    }
    error = assert_error(sm_client.post("/training-jobs", json=body), 400, "invalid_input", "_num_cpus")
    assert error["details"] == [{"parameter": "_num_cpus", "message": "unknown hyperparameter"}]
    assert aws.state.training_jobs == {}


def test_metric_names_are_the_same_on_both_backends(sm_client: TestClient, aws: FakeSageMaker, worker: Worker) -> None:
    test_set = upload_csv(sm_client, "holdout", TEST_CSV, "id")
    hyperparameters = {**SDK_MAP, "eval_metrics": '["msd", "ssd"]'}
    submit(sm_client, test_dataset_id=test_set["id"], hyperparameters=hyperparameters)
    poll(worker)
    aws.put_artifact("sm-job", write_model_tar(CENTERS))
    aws.set_training(
        "sm-job",
        "Completed",
        "Completed",
        [("Completed", "Training job completed")],
        final_metric_data_list=[
            {"MetricName": "train:progress", "Value": 100.0, "Timestamp": 0},  # about the run, not the model
            {"MetricName": "train:throughput", "Value": 2.4e5, "Timestamp": 0},
            {"MetricName": "train:msd", "Value": 0.0433, "Timestamp": 0},
            {"MetricName": "test:msd", "Value": 0.0512, "Timestamp": 0},
            {"MetricName": "test:ssd", "Value": 0.2048, "Timestamp": 0},
        ],
    )
    poll(worker)
    remote = sm_client.get(f"/models/{job(sm_client)['model_id']}").json()

    local_job = {
        "name": "local-job",
        "train_dataset_id": job(sm_client)["train_dataset_id"],
        "test_dataset_id": test_set["id"],
        "backend": "local",
        "hyperparameters": hyperparameters,
    }
    accepted = sm_client.post("/training-jobs", json=local_job)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["ignored_hyperparameters"] == sorted(k for k in SDK_MAP if k[0] == "_" or k == "force_dense")
    poll(worker)
    local = sm_client.get(f"/models/{job(sm_client, 'local-job')['model_id']}").json()

    names = {"train:msd", "train:msd_full_pass", "train:ssd_full_pass", "test:msd", "test:ssd"}
    assert set(remote["metrics"]) == set(local["metrics"]) == names


def test_full_pass_metrics_are_left_out_when_the_pass_would_outlast_the_lease(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker
) -> None:
    submit(sm_client)
    poll(worker)
    backend = backend_of(sm_client)
    backend.settings = backend.settings.model_copy(update={"lease_seconds": 1e-9})
    complete(aws)
    poll(worker)
    done = job(sm_client)
    assert done["status"] == "Completed"
    assert "full-pass training metrics not computed" in done["status_message"]
    metrics = sm_client.get(f"/models/{done['model_id']}").json()["metrics"]
    assert metrics == {"train:msd": 0.0433, "test:msd": 0.0512, "test:ssd": 0.2048}


# --- shards and instances; the lease during uploads (issue 13, part 7) -----------------------------


def rows_csv(rows: int) -> bytes:
    return ("id,x,y\n" + "".join(f"r{i},{i % 10},{i // 10}\n" for i in range(rows))).encode()


def test_rows_are_spread_so_that_every_instance_gets_an_object(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker
) -> None:
    """100 rows on 30 instances: 30 objects of 4 or 3 rows (once 25 objects of 4: five hosts idle)."""
    creates = record(backend_of(sm_client).client("sagemaker"), "CreateTrainingJob")
    dataset = upload_csv(sm_client, "hundred", rows_csv(100), "id")
    body = {
        "name": "sm-job",
        "train_dataset_id": dataset["id"],
        "backend": "sagemaker",
        "hyperparameters": {"k": 3},
        "resource_config": {"instance_count": 30},
    }
    assert sm_client.post("/training-jobs", json=body).status_code == 202
    poll(worker)
    keys = aws.keys(f"{PREFIX}/sm-job/train/")
    assert keys == [f"{PREFIX}/sm-job/train/data-{i:05d}.csv" for i in range(30)]
    sizes = [len(aws.get(key).decode().splitlines()) for key in keys]
    assert sizes == [3] * 20 + [4] * 10 or sorted(sizes) == [3] * 20 + [4] * 10
    assert sum(sizes) == 100 and max(sizes) - min(sizes) == 1
    assert "".join(aws.get(key).decode() for key in keys).splitlines()[:2] == ["0,0", "1,0"]  # in order
    assert creates.params[0]["ResourceConfig"]["InstanceCount"] == 30
    submitted = job(sm_client)
    assert (submitted["remote"]["instance_count"], submitted["remote"]["train_objects"]) == (30, 30)
    assert "instance_count_requested" not in submitted["remote"]
    assert submitted["status_message"] == "submitted to SageMaker as training job sm-job"


def test_fewer_rows_than_instances_asks_for_fewer_instances_and_says_so(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker
) -> None:
    creates = record(backend_of(sm_client).client("sagemaker"), "CreateTrainingJob")
    submit(sm_client, resource_config={"instance_count": 100})  # the 60 rows of BLOBS_CSV
    poll(worker)
    keys = aws.keys(f"{PREFIX}/sm-job/train/")
    assert len(keys) == 60 and all(len(aws.get(key).decode().splitlines()) == 1 for key in keys)
    assert creates.params[0]["ResourceConfig"]["InstanceCount"] == 60
    assert aws.training_job("sm-job").resource_config["InstanceCount"] == 60
    submitted = job(sm_client)
    remote = submitted["remote"]
    assert (remote["instance_count"], remote["instance_count_requested"], remote["train_objects"]) == (60, 100, 60)
    assert submitted["status_message"].startswith(
        "submitted to SageMaker as training job sm-job on 60 instances instead of the 100 configured: "
        "the training data has 60 rows"
    )
    assert submitted["resource_config"] == {"instance_count": 100}  # what was asked stays visible
    aws.set_training("sm-job", "InProgress", "Training", [("Training", "Training in progress")])
    poll(worker)  # SageMaker's messages take over the status message; the remote fields stay
    assert job(sm_client)["remote"]["instance_count_requested"] == 100


@pytest.fixture
def slow_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training upload in many small multipart pieces, each a little slow (~1.2 s in all)."""
    import moto.s3.models

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 64)
    monkeypatch.setattr(sagemaker_module, "PART_BYTES", 100)
    monkeypatch.setattr(sagemaker_module, "READ_BATCH_ROWS", 2)
    original = sagemaker_module._MultipartWriter.write

    def slow(self: sagemaker_module._MultipartWriter, data: bytes) -> None:
        time.sleep(0.04)
        original(self, data)

    monkeypatch.setattr(sagemaker_module._MultipartWriter, "write", slow)


@pytest.fixture
def short_lease_client(sm_settings: Settings, aws: FakeSageMaker) -> Iterator[TestClient]:
    """A 0.5 s lease; a first poll 2 s after submission (so no one polls while the test watches)."""
    settings = sm_settings.model_copy(update={"lease_seconds": 0.5, "remote_poll_seconds": 60.0})
    with TestClient(create_app(settings)) as client:
        yield client


def test_an_upload_slower_than_the_lease_is_not_claimed_by_a_second_worker(
    short_lease_client: TestClient, aws: FakeSageMaker, slow_upload: None
) -> None:
    client = short_lease_client
    state = client.app.state.centroid  # type: ignore[attr-defined]
    creates = record(backend_of(client).client("sagemaker"), "CreateTrainingJob")
    uploads = record(backend_of(client).client("s3"), "CreateMultipartUpload")
    submit(client)
    first, second = Worker(state, worker_id="first"), Worker(state, worker_id="second")
    started = time.monotonic()
    thread = threading.Thread(target=first.jobs.step)
    thread.start()
    wait_for(lambda: len(uploads.params), lambda n: n > 0)  # the first worker holds the job, uploading
    claimed_by_second = []
    while thread.is_alive():
        claimed_by_second.append(second.jobs.step())
        time.sleep(0.05)
    thread.join()
    elapsed = time.monotonic() - started

    assert elapsed > 2 * state.settings.lease_seconds  # the upload outlasted the lease twice over
    assert len(claimed_by_second) > 10 and not any(claimed_by_second)
    assert len(uploads.params) == 1 and len(creates.params) == 1  # uploaded once, submitted once
    submitted = job(client)
    assert submitted["status"] == "InProgress" and submitted["remote"]["training_job_arn"].endswith("/sm-job")
    assert submitted["attempts"] == 1
    np.testing.assert_array_equal(
        np.loadtxt(io.StringIO(aws.get(f"{PREFIX}/sm-job/train/data.csv").decode()), delimiter=","), blob_features()
    )


@pytest.mark.parametrize("interruption", ["stop", "shutdown"])
def test_an_upload_is_abandoned_on_stop_or_shutdown(
    short_lease_client: TestClient, aws: FakeSageMaker, slow_upload: None, interruption: str
) -> None:
    client = short_lease_client
    state = client.app.state.centroid  # type: ignore[attr-defined]
    creates = record(backend_of(client).client("sagemaker"), "CreateTrainingJob")
    parts = record(backend_of(client).client("s3"), "UploadPart")
    aborts = record(backend_of(client).client("s3"), "AbortMultipartUpload")
    submit(client)
    worker = Worker(state, worker_id="first")
    thread = threading.Thread(target=worker.jobs.step)
    thread.start()
    wait_for(lambda: len(parts.params), lambda n: n > 0)
    if interruption == "stop":
        assert client.post("/training-jobs/sm-job/stop").json()["status"] == "Stopping"
    else:
        worker.request_shutdown()
    thread.join(30)

    assert len(aborts.params) == 1 and creates.params == [] and aws.state.training_jobs == {}
    assert aws.keys(f"{PREFIX}/sm-job/train/") == []  # the object never completed
    ended = job(client)
    if interruption == "stop":
        assert ended["status"] == "Stopped"
        assert ended["status_message"].startswith("stopped while uploading the training data, before submission")
    else:  # released for another worker, which uploads and submits it
        assert (ended["status"], ended["attempts"]) == ("Pending", 0)
        Worker(state, worker_id="next").jobs.step()
        assert job(client)["status"] == "InProgress" and len(creates.params) == 1
