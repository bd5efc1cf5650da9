"""Training jobs over HTTP: submission, validation, ceilings, lifecycle, stop, delete."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.db.tables import TrainingJobTable
from service.main import create_app
from service.settings import Settings
from tests.helpers import BLOBS_CSV, assert_error, run_worker_until_idle, start_job, upload_csv


@pytest.fixture
def blobs(client: TestClient) -> dict:  # type: ignore[type-arg]
    return upload_csv(client, "blobs", BLOBS_CSV, "id")


def test_submit_returns_202_pending_with_resolved_hyperparameters(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    job = start_job(client, "j1", blobs["id"], hyperparameters={"k": "3", "mini_batch_size": "20", "seed": 5})
    assert job["status"] == "Pending" and job["secondary_status"] == "Starting"
    assert job["feature_columns"] == ["x", "y"]
    assert job["hyperparameters"]["k"] == 3 and job["hyperparameters"]["feature_dim"] == 2
    assert job["hyperparameters"]["extra_center_factor"] == "auto"
    assert job["progress"] == {"points_processed": 0, "points_total": 60, "percent": 0.0}
    assert job["backend"] == "local" and job["model_id"] is None


def test_a_job_runs_to_completion_and_registers_a_model(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    start_job(client, "j1", blobs["id"], hyperparameters={"k": 3, "epochs": 2, "mini_batch_size": 7, "seed": 3})
    run_worker_until_idle(client.app)
    job = client.get("/training-jobs/j1").json()
    assert job["status"] == "Completed" and job["secondary_status"] == "Completed"
    assert job["progress"] == {"points_processed": 120, "points_total": 120, "percent": 100.0}
    assert job["started_at"] <= job["ended_at"]
    assert job["training_seconds"] >= 0 and job["billable_seconds"] == job["training_seconds"]
    assert [t["status"] for t in job["status_transitions"]] == ["Starting", "Training", "Completed"]
    assert all(t["end_time"] for t in job["status_transitions"])
    assert job["attempts"] == 1
    model = client.get(f"/models/{job['model_id']}").json()
    assert model["training_job_name"] == "j1" and model["k"] == 3 and model["feature_names"] == ["x", "y"]
    assert sorted(model["cluster_sizes"]) == [20, 20, 20]
    assert model["metrics"]["train:msd_full_pass"] < 0.5  # blobs 10 apart, each about 0.4 wide


@pytest.mark.slow
def test_test_dataset_gives_test_metrics(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    test = upload_csv(client, "test", b"id,x,y\nt1,0,0\nt2,10,0\nt3,0,10\n", "id")
    hyperparameters = {"k": 3, "seed": 1, "eval_metrics": ["msd", "ssd"]}
    start_job(client, "j1", blobs["id"], test_dataset_id=test["id"], hyperparameters=hyperparameters)
    run_worker_until_idle(client.app)
    model_id = client.get("/training-jobs/j1").json()["model_id"]
    metrics = client.get(f"/models/{model_id}").json()["metrics"]
    assert set(metrics) == {"train:msd", "train:msd_full_pass", "train:ssd_full_pass", "test:msd", "test:ssd"}
    assert metrics["test:ssd"] == pytest.approx(3 * metrics["test:msd"])


def test_list_filters_by_status_and_paginates(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    for i in range(3):
        start_job(client, f"j{i}", blobs["id"])
    client.post("/training-jobs/j0/stop")
    page = client.get("/training-jobs", params={"status": "Pending"}).json()
    assert page["total"] == 2 and {j["name"] for j in page["items"]} == {"j1", "j2"}
    assert client.get("/training-jobs", params={"limit": 1, "offset": 2}).json()["items"][0]["name"] == "j0"
    assert_error(client.get("/training-jobs", params={"status": "Bogus"}), 422, "validation_error")


def test_duplicate_name_is_409(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    start_job(client, "same", blobs["id"])
    assert_error(
        client.post(
            "/training-jobs", json={"name": "same", "train_dataset_id": blobs["id"], "hyperparameters": {"k": 2}}
        ),
        409,
        "conflict",
        "already exists",
    )


@pytest.mark.parametrize(
    ("body", "status", "code", "fragment"),
    [
        ({"feature_columns": ["x", "nope"]}, 400, "invalid_input", "'nope' are not in the training dataset"),
        ({"feature_columns": ["x", "label"]}, 400, "invalid_input", "'label' of the training dataset is not numeric"),
        ({"feature_columns": ["id"]}, 400, "invalid_input", "not numeric"),
        ({"feature_columns": ["x", "x"]}, 400, "invalid_input", "must not repeat"),
        ({"hyperparameters": {"k": 61}}, 400, "invalid_input", "k: must be <= the number of training rows (60)"),
        ({"hyperparameters": {"k": 1}}, 400, "invalid_input", "k:"),
        ({"hyperparameters": {"k": 3, "feature_dim": 4}}, 400, "invalid_input", "feature_dim"),
        ({"hyperparameters": {"k": 3, "init_method": "best"}}, 400, "invalid_input", "init_method"),
        ({"hyperparameters": {"k": 3, "local_lloyd_tol": 2}}, 400, "invalid_input", "local_lloyd_tol"),
        ({"hyperparameters": {"k": 3, "eval_metrics": ["rmse"]}}, 400, "invalid_input", "eval_metrics"),
        ({"hyperparameters": {"k": 3, "bogus": 1}}, 400, "invalid_input", "bogus: unknown hyperparameter"),
        ({"hyperparameters": {}}, 422, "validation_error", ""),
        ({"backend": "sagemaker"}, 409, "not_configured", "backend 'sagemaker'"),
        ({"backend": "azure"}, 422, "validation_error", ""),
        ({"name": "bad name!"}, 422, "validation_error", ""),
        ({"train_dataset_id": "ds-nope"}, 404, "not_found", "ds-nope"),
        ({"test_dataset_id": "ds-nope"}, 404, "not_found", "ds-nope"),
    ],
)
@pytest.mark.slow
def test_bad_submissions_create_nothing(
    client: TestClient, blobs: dict, body: dict, status: int, code: str, fragment: str
) -> None:  # type: ignore[type-arg]
    request = {"name": "bad", "train_dataset_id": blobs["id"], "hyperparameters": {"k": 3}, **body}
    assert_error(client.post("/training-jobs", json=request), status, code, fragment)
    assert client.get("/training-jobs").json()["total"] == 0


def test_hyperparameter_errors_list_every_problem(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    request = {
        "name": "bad",
        "train_dataset_id": blobs["id"],
        "hyperparameters": {"k": 3, "epochs": 0, "mini_batch_size": "x"},
    }
    error = assert_error(client.post("/training-jobs", json=request), 400, "invalid_input")
    assert {d["parameter"] for d in error["details"]} == {"epochs", "mini_batch_size"}


def test_features_with_nulls_are_refused(client: TestClient) -> None:
    holes = upload_csv(client, "holes", b"id,x\na,1\nb,\nc,3\n", "id")
    assert_error(
        client.post("/training-jobs", json={"name": "j", "train_dataset_id": holes["id"], "hyperparameters": {"k": 2}}),
        400,
        "invalid_input",
        "nulls",
    )


def test_test_set_must_have_the_features(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    other = upload_csv(client, "other", b"id,z\na,1\n", "id")
    assert_error(
        client.post(
            "/training-jobs",
            json={
                "name": "j",
                "train_dataset_id": blobs["id"],
                "test_dataset_id": other["id"],
                "hyperparameters": {"k": 2},
            },
        ),
        400,
        "invalid_input",
        "not in the test dataset",
    )


def test_stop_a_pending_job_at_once(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    start_job(client, "j", blobs["id"])
    stopped = client.post("/training-jobs/j/stop").json()
    assert stopped["status"] == "Stopped" and stopped["ended_at"]
    run_worker_until_idle(client.app)
    assert client.get("/training-jobs/j").json()["model_id"] is None
    assert_error(client.post("/training-jobs/j/stop"), 409, "conflict", "already Stopped")
    assert_error(client.post("/training-jobs/nope/stop"), 404, "not_found")
    assert_error(client.get("/training-jobs/nope"), 404, "not_found")


def test_datasets_used_by_jobs_and_models_cannot_be_deleted(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    start_job(client, "j", blobs["id"])
    error = assert_error(client.delete(f"/datasets/{blobs['id']}"), 409, "conflict", "training job 'j'")
    assert error["details"]["used_by"]
    assert client.get(f"/datasets/{blobs['id']}").status_code == 200


# --- ceilings on what a job may cost (issue 16, #2 and #6) ----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("hyperparameters", "parameter", "ceiling"),
    [
        ('{"k": 3, "local_lloyd_num_trials": 10000000}', "local_lloyd_num_trials", 100),
        ('{"k": 3, "epochs": 1000000000000000000}', "epochs", 10_000),
        ('{"k": 3, "epochs": 1' + "0" * 400 + "}", "epochs", 10_000),
        ('{"k": 3, "epochs": "1' + "0" * 400 + '"}', "epochs", 10_000),
        ('{"k": 3, "mini_batch_size": 9223372036854775808}', "mini_batch_size", 1_000_000),
        ('{"k": 3, "extra_center_factor": 1000000}', "extra_center_factor", 100),
        ('{"k": 3, "local_lloyd_max_iter": 1000000000}', "local_lloyd_max_iter", 10_000),
        ('{"k": 1' + "0" * 400 + "}", "k", 10_000),
    ],
)
def test_hyperparameters_above_a_ceiling_are_400_naming_the_parameter_and_ceiling(
    client: TestClient,
    blobs: dict,  # type: ignore[type-arg]
    hyperparameters: str,
    parameter: str,
    ceiling: int,
) -> None:
    body = f'{{"name": "hostile", "train_dataset_id": "{blobs["id"]}", "hyperparameters": {hyperparameters}}}'
    response = client.post("/training-jobs", content=body, headers={"content-type": "application/json"})
    error = assert_error(response, 400, "invalid_input", f"{parameter}: must be <= {ceiling}, this service's ceiling")
    assert [detail["parameter"] for detail in error["details"]] == [parameter]
    assert len(response.content) < 2000
    assert client.get("/training-jobs").json()["total"] == 0


def test_huge_tolerance_is_refused_not_a_500(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    body = (
        f'{{"name": "hostile", "train_dataset_id": "{blobs["id"]}", '
        f'"hyperparameters": {{"k": 3, "local_lloyd_tol": "1{"0" * 400}"}}}}'
    )
    response = client.post("/training-jobs", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_input", "local_lloyd_tol: must be a number in [0, 1]")


def test_ceilings_are_configurable(settings: Settings) -> None:
    limited = settings.model_copy(update={"max_epochs": 5, "max_lloyd_trials": 12, "max_k": 4})
    with TestClient(create_app(limited)) as client:
        dataset = upload_csv(client, "blobs", BLOBS_CSV, "id")
        error = assert_error(
            client.post(
                "/training-jobs",
                json={
                    "name": "j",
                    "train_dataset_id": dataset["id"],
                    "hyperparameters": {"k": 5, "epochs": 6, "local_lloyd_num_trials": 13},
                },
            ),
            400,
            "invalid_input",
        )
        assert {d["parameter"]: d["message"].split(" (got")[0] for d in error["details"]} == {
            "k": "must be <= 4, this service's ceiling",
            "epochs": "must be <= 5, this service's ceiling",
            "local_lloyd_num_trials": "must be <= 12, this service's ceiling",
        }
        start_job(client, "ok", dataset["id"], hyperparameters={"k": 4, "epochs": 5, "local_lloyd_num_trials": 12})


def test_k_times_feature_dim_is_bounded_by_the_centroid_values_ceiling(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_centroid_values": 5}))) as client:
        dataset = upload_csv(client, "blobs", BLOBS_CSV, "id")
        assert_error(
            client.post(
                "/training-jobs",
                json={"name": "j", "train_dataset_id": dataset["id"], "hyperparameters": {"k": 3}},
            ),
            400,
            "invalid_input",
            "k: k x feature_dim (6) must be <= 5",
        )
        start_job(client, "ok", dataset["id"], hyperparameters={"k": 2})


# --- deleting finished jobs, then their datasets (issue 16, #11) ----------------------------------


def test_a_completed_job_can_be_deleted_and_its_model_stays(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    start_job(client, "j", blobs["id"])
    run_worker_until_idle(client.app)
    model_id = client.get("/training-jobs/j").json()["model_id"]

    assert client.delete("/training-jobs/j").status_code == 204
    assert_error(client.get("/training-jobs/j"), 404, "not_found")
    assert_error(client.delete("/training-jobs/j"), 404, "not_found")
    model = client.get(f"/models/{model_id}").json()
    assert model["training_job_name"] is None and model["name"] == "j"

    # The model still uses the dataset; once it is gone, so can the dataset be.
    assert_error(client.delete(f"/datasets/{blobs['id']}"), 409, "conflict", f"model '{model_id}'")
    assert client.delete(f"/models/{model_id}").status_code == 204
    assert client.delete(f"/datasets/{blobs['id']}").status_code == 204


def test_the_name_of_a_deleted_job_can_be_used_again(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    start_job(client, "again", blobs["id"])
    run_worker_until_idle(client.app)
    first = client.get("/training-jobs/again").json()["model_id"]
    assert client.delete("/training-jobs/again").status_code == 204
    start_job(client, "again", blobs["id"])
    run_worker_until_idle(client.app)
    second = client.get("/training-jobs/again").json()
    assert second["status"] == "Completed" and second["model_id"] != first
    assert client.get(f"/models/{second['model_id']}").json()["training_job_name"] == "again"
    assert client.get(f"/models/{first}").json()["training_job_name"] is None


def test_a_stopped_job_can_be_deleted_and_then_its_datasets(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    test = upload_csv(client, "test", b"id,x,y\nt1,0,0\nt2,10,0\nt3,0,10\n", "id")
    start_job(client, "j", blobs["id"], test_dataset_id=test["id"])
    assert client.post("/training-jobs/j/stop").json()["status"] == "Stopped"
    assert_error(client.delete(f"/datasets/{test['id']}"), 409, "conflict", "training job 'j'")
    assert client.delete("/training-jobs/j").status_code == 204
    assert client.delete(f"/datasets/{test['id']}").status_code == 204
    assert client.delete(f"/datasets/{blobs['id']}").status_code == 204


def test_a_failed_job_can_be_deleted(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    start_job(client, "j", blobs["id"])
    with client.app.state.centroid.database.session() as session:  # type: ignore[attr-defined]
        session.execute(
            update(TrainingJobTable).values(status="Failed", secondary_status="Failed", failure_reason="test")
        )
        session.commit()
    assert client.delete("/training-jobs/j").status_code == 204
    assert client.delete(f"/datasets/{blobs['id']}").status_code == 204


@pytest.mark.slow
@pytest.mark.parametrize("status", ["Pending", "InProgress", "Stopping"])
def test_a_job_that_may_still_run_cannot_be_deleted(client: TestClient, blobs: dict, status: str) -> None:  # type: ignore[type-arg]
    start_job(client, "j", blobs["id"])
    with client.app.state.centroid.database.session() as session:  # type: ignore[attr-defined]
        session.execute(update(TrainingJobTable).values(status=status))
        session.commit()
    error = assert_error(client.delete("/training-jobs/j"), 409, "conflict", f"is {status}")
    assert error["details"] == {"name": "j", "status": status}
    assert "stop it first" in error["message"]
    assert client.get("/training-jobs/j").json()["status"] == status


def test_local_centers_are_bounded_so_a_stop_never_waits_long(client: TestClient) -> None:
    blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
    body = {"name": "wide", "train_dataset_id": blobs["id"], "hyperparameters": {"k": 200, "extra_center_factor": 100}}
    response = client.post("/training-jobs", json=body)
    assert response.status_code == 400, response.text
    assert "CENTROID_MAX_LOCAL_CENTERS" in response.text and "extra_center_factor" in response.text


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
SAGEMAKER_ONLY = sorted(key for key in SDK_MAP if key == "force_dense" or key.startswith("_"))


def test_an_sdk_hyperparameter_map_trains_locally_and_lists_what_was_ignored(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    job = start_job(client, "sdk", blobs["id"], hyperparameters=SDK_MAP)
    assert (
        job["ignored_hyperparameters"]
        == SAGEMAKER_ONLY
        == [
            "_disable_wait_to_read",
            "_enable_profiler",
            "_kvstore",
            "_log_level",
            "_num_gpus",
            "_num_kv_servers",
            "_num_slices",
            "_tuning_objective_metric",
            "force_dense",
        ]
    )
    assert {key: job["hyperparameters"][key] for key in SAGEMAKER_ONLY} == {key: SDK_MAP[key] for key in SAGEMAKER_ONLY}
    assert job["hyperparameters"]["k"] == 3 and job["hyperparameters"]["eval_metrics"] == ["msd"]
    run_worker_until_idle(client.app)
    done = client.get("/training-jobs/sdk").json()
    assert done["status"] == "Completed", done
    assert done["ignored_hyperparameters"] == SAGEMAKER_ONLY
    model = client.get(f"/models/{done['model_id']}").json()
    assert model["hyperparameters"]["force_dense"] == "True"
    assert set(model["metrics"]) == {"train:msd", "train:msd_full_pass"}
    # the SageMaker-only keys change nothing: the same job without them trains the same model
    plain = {key: value for key, value in SDK_MAP.items() if key not in SAGEMAKER_ONLY}
    start_job(client, "plain", blobs["id"], hyperparameters={**plain, "seed": 4})
    start_job(client, "sdk-seeded", blobs["id"], hyperparameters={**SDK_MAP, "seed": 4})
    run_worker_until_idle(client.app)
    jobs = [client.get(f"/training-jobs/{name}").json() for name in ("plain", "sdk-seeded")]
    assert [j["ignored_hyperparameters"] for j in jobs] == [[], SAGEMAKER_ONLY]
    centroids = [client.get(f"/models/{j['model_id']}/centroids").json()["centroids"] for j in jobs]
    assert centroids[0] == centroids[1]


def test_sdk_values_are_accepted_in_every_form_sagemaker_takes(client: TestClient, blobs: dict) -> None:  # type: ignore[type-arg]
    forms = {"force_dense": True, "_enable_profiler": "FALSE", "_num_gpus": 0, "_num_kv_servers": "auto"}
    job = start_job(client, "forms", blobs["id"], hyperparameters={"k": 3, **forms})
    assert {key: job["hyperparameters"][key] for key in forms} == {
        "force_dense": "True",  # a JSON boolean becomes the string the SDK writes
        "_enable_profiler": "FALSE",
        "_num_gpus": "0",
        "_num_kv_servers": "auto",
    }


@pytest.mark.parametrize(
    ("hyperparameters", "problems"),
    [
        ({"force_dense": "yes"}, {"force_dense": "must be 'true' or 'false' (any case) (got 'yes')"}),
        ({"_num_slices": "0"}, {"_num_slices": "must be an integer >= 1 (got '0')"}),
        ({"_num_gpus": "two"}, {"_num_gpus": "must be an integer >= 0 or 'auto' (got 'two')"}),
        ({"_log_level": ["info"]}, {"_log_level": "must be a string, a number or a boolean (got ['info'])"}),
        ({"_num_cpus": "1", "force_dense": "true"}, {"_num_cpus": "unknown hyperparameter"}),
        ({"sagemaker_extras": {"force_dense": "true"}}, {"sagemaker_extras": "unknown hyperparameter"}),
    ],
)
def test_sagemaker_only_keys_with_bad_values_and_unknown_names_are_refused(
    client: TestClient,
    blobs: dict,  # type: ignore[type-arg]
    hyperparameters: dict,  # type: ignore[type-arg]
    problems: dict[str, str],
) -> None:
    request = {"name": "bad", "train_dataset_id": blobs["id"], "hyperparameters": {"k": 3, **hyperparameters}}
    error = assert_error(client.post("/training-jobs", json=request), 400, "invalid_input", "invalid hyperparameters")
    assert {d["parameter"]: d["message"] for d in error["details"]} == problems
    assert client.get("/training-jobs").json()["total"] == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("eval_metrics", "expected"),
    [
        (None, {"train:msd", "train:msd_full_pass", "test:msd"}),
        (["msd"], {"train:msd", "train:msd_full_pass", "test:msd"}),
        ('["msd"]', {"train:msd", "train:msd_full_pass", "test:msd"}),
        (["ssd"], {"train:msd", "train:ssd_full_pass", "test:ssd"}),
        (["ssd", "msd"], {"train:msd", "train:msd_full_pass", "train:ssd_full_pass", "test:msd", "test:ssd"}),
        ('["msd", "ssd"]', {"train:msd", "train:msd_full_pass", "train:ssd_full_pass", "test:msd", "test:ssd"}),
    ],
)
def test_local_jobs_honour_eval_metrics(
    client: TestClient, blobs: dict, eval_metrics: object, expected: set[str]
) -> None:  # type: ignore[type-arg]
    test = upload_csv(client, "test", b"id,x,y\nt1,0,0\nt2,10,0\nt3,0,10\n", "id")
    hyperparameters = {"k": 3, "seed": 2} | ({} if eval_metrics is None else {"eval_metrics": eval_metrics})
    start_job(client, "j1", blobs["id"], test_dataset_id=test["id"], hyperparameters=hyperparameters)
    run_worker_until_idle(client.app)
    model_id = client.get("/training-jobs/j1").json()["model_id"]
    metrics = client.get(f"/models/{model_id}").json()["metrics"]
    assert set(metrics) == expected
    # SageMaker's train:msd (the local centers against the final ones) is not the full pass
    if "train:msd_full_pass" in metrics:
        assert metrics["train:msd"] != metrics["train:msd_full_pass"]


def test_sagemaker_jobs_list_the_seed_as_ignored() -> None:
    from service.jobs.service import ignored_hyperparameters

    assert ignored_hyperparameters("sagemaker", {"k": 3, "seed": 7, "force_dense": "True"}) == ["seed"]
    assert ignored_hyperparameters("sagemaker", {"k": 3, "seed": None}) == []
    assert ignored_hyperparameters("local", {"k": 3, "seed": 7, "_kvstore": "auto", "force_dense": "True"}) == [
        "_kvstore",
        "force_dense",
    ]
