"""SageMaker endpoints: lifecycle, switches, deletion, invocations and GET /backends, against moto."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError
from fastapi.testclient import TestClient
from moto.sagemaker.models import SageMakerModelBackend

from service.main import create_app
from service.settings import Settings
from tests.helpers import BLOBS_CSV, assert_error, deployed, trained_model, upload_csv
from tests.sagemaker.conftest import (
    BUCKET,
    FAKE_KEY_ID,
    FAKE_SECRET,
    FAKE_TOKEN,
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

CSV = {"content-type": "text/csv"}


@pytest.fixture
def models(sm_client: TestClient) -> list[dict[str, Any]]:
    """Two locally trained models: a local model deploys to SageMaker as well."""
    blobs = upload_csv(sm_client, "blobs", BLOBS_CSV, "id")
    return [trained_model(sm_client, blobs["id"], name=f"local-{i}") for i in range(2)]


def endpoint(client: TestClient, name: str = "sm-ep") -> dict[str, Any]:
    return client.get(f"/endpoints/{name}").json()  # type: ignore[no-any-return]


def create(client: TestClient, model_id: str, name: str = "sm-ep", **fields: Any) -> dict[str, Any]:
    response = client.post("/endpoints", json={"name": name, "model_id": model_id, "backend": "sagemaker", **fields})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "Creating"
    return response.json()  # type: ignore[no-any-return]


def in_service(client: TestClient, aws: FakeSageMaker, worker: Worker, model_id: str, name: str = "sm-ep") -> None:
    create(client, model_id, name)
    poll(worker)
    aws.set_endpoint(name, "InService")
    poll(worker)
    assert endpoint(client, name)["status"] == "InService"


def missing(call: Any, **kwargs: Any) -> bool:
    try:
        call(**kwargs)
    except ClientError as exc:
        return "Could not find" in str(exc)
    return False


def test_endpoint_lifecycle_create_switch_delete(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, models: list[dict[str, Any]]
) -> None:
    first, second = (m["id"] for m in models)
    create(sm_client, first, instance_type="ml.c5.large", instance_count=2)
    poll(worker)  # artifact to S3, CreateModel, CreateEndpointConfig, CreateEndpoint
    creating = endpoint(sm_client)
    assert creating["status"] == "Creating" and creating["remote"]["endpoint_name"] == "sm-ep"
    assert creating["remote"]["endpoint_arn"].endswith(":endpoint/sm-ep")

    artifact_key = f"{PREFIX}/models/{first}/model.tar.gz"
    assert aws.get(artifact_key) == sm_client.get(f"/models/{first}/artifact").content
    name = f"sm-ep-{first}"
    model = aws.sagemaker.describe_model(ModelName=name)
    assert model["PrimaryContainer"] == {
        "Image": KMEANS_IMAGE_US_EAST_1,
        "ModelDataUrl": f"s3://{BUCKET}/{artifact_key}",
    }
    assert model["ExecutionRoleArn"] == ROLE
    variant = aws.sagemaker.describe_endpoint_config(EndpointConfigName=name)["ProductionVariants"][0]
    assert (variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == (name, "ml.c5.large", 2)
    assert aws.endpoint("sm-ep").endpoint_config_name == name

    aws.set_endpoint("sm-ep", "Creating")  # SageMaker takes minutes; moto is instant
    poll(worker)
    assert endpoint(sm_client)["status"] == "Creating"
    aws.set_endpoint("sm-ep", "InService")
    poll(worker)
    assert endpoint(sm_client)["status"] == "InService"

    # switch: UpdateEndpoint to a new config; the old model keeps serving until SageMaker is done
    updates = record(backend_of(sm_client).client("sagemaker"), "UpdateEndpoint")
    assert sm_client.put("/endpoints/sm-ep", json={"model_id": second}).json()["status"] == "Updating"
    poll(worker)
    new_name = f"sm-ep-{second}"
    assert updates.params == [{"EndpointName": "sm-ep", "EndpointConfigName": new_name}]
    updating = endpoint(sm_client)
    assert (updating["status"], updating["model_id"], updating["pending_model_id"]) == ("Updating", first, second)
    poll(worker)
    assert endpoint(sm_client)["status"] == "Updating" and len(updates.params) == 1
    aws.finish_update("sm-ep")
    poll(worker)
    switched = endpoint(sm_client)
    assert (switched["status"], switched["model_id"], switched["pending_model_id"]) == ("InService", second, None)
    assert missing(aws.sagemaker.describe_endpoint_config, EndpointConfigName=name)  # the old one is tidied up
    assert missing(aws.sagemaker.describe_model, ModelName=name)
    assert aws.sagemaker.describe_model(ModelName=new_name)["PrimaryContainer"]["ModelDataUrl"].endswith(
        f"/models/{second}/model.tar.gz"
    )

    # delete: endpoint, config and model all gone
    assert sm_client.delete("/endpoints/sm-ep").json()["status"] == "Deleting"
    poll(worker)
    assert_error(sm_client.get("/endpoints/sm-ep"), 404, "not_found")
    assert aws.sagemaker.list_endpoints()["Endpoints"] == []
    assert aws.sagemaker.list_endpoint_configs()["EndpointConfigs"] == []
    assert aws.sagemaker.list_models()["Models"] == []


def test_invocations_go_through_invoke_endpoint(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, models: list[dict[str, Any]]
) -> None:
    in_service(sm_client, aws, worker, models[0]["id"])
    deployed(sm_client, models[0]["id"], name="local-ep")
    invokes = record(backend_of(sm_client).client("sagemaker-runtime"), "InvokeEndpoint")
    answer = {
        "predictions": [
            {"closest_cluster": 1.0, "distance_to_cluster": 0.25},
            {"closest_cluster": 2.0, "distance_to_cluster": 0.5},
        ]
    }
    aws.queue_results(answer)

    body = "9.9,0.3\n0.1,9.7"
    remote = sm_client.post("/endpoints/sm-ep/invocations", content=body, headers=CSV)
    assert remote.status_code == 200, remote.text
    assert remote.json() == answer
    assert invokes.params == [
        {"EndpointName": "sm-ep", "ContentType": "text/csv", "Accept": "application/json", "Body": "9.9,0.3\n0.1,9.7\n"}
    ]
    local = sm_client.post("/endpoints/local-ep/invocations", content=body, headers=CSV)
    assert local.headers["content-type"] == remote.headers["content-type"]
    assert [set(p) for p in local.json()["predictions"]] == [set(p) for p in remote.json()["predictions"]]

    aws.queue_results(
        {
            "predictions": [
                {"closest_cluster": 0.0, "distance_to_cluster": 0.1},
                {"closest_cluster": 2.0, "distance_to_cluster": 0.2},
            ]
        }
    )
    rows = [{"id": "a", "x": 0.1, "y": 0.1}, {"id": "b", "x": 0.2, "y": 10.0}]
    friendly = sm_client.post("/endpoints/sm-ep/predictions", json={"rows": rows})
    assert friendly.status_code == 200, friendly.text
    result = friendly.json()
    assert [(p["key"], p["closest_cluster"], p["distance_to_cluster"]) for p in result["predictions"]] == [
        ("a", 0, 0.1),
        ("b", 2, 0.2),
    ]
    assert result["cluster_counts"] == {"0": 1, "1": 0, "2": 1}
    assert invokes.params[-1]["Body"] == "0.1,0.1\n0.2,10.0\n"
    local_rows = sm_client.post("/endpoints/local-ep/predictions", json={"rows": rows}).json()
    assert set(local_rows) == set(result) and [set(p) for p in local_rows["predictions"]] == [
        set(p) for p in result["predictions"]
    ]


@pytest.mark.parametrize(
    ("status", "code", "extra", "expected", "fragment"),
    [
        (
            424,
            "ModelError",
            {"OriginalStatusCode": 400, "OriginalMessage": "bad row"},
            (400, "invalid_input"),
            "rejected the input",
        ),
        (
            424,
            "ModelError",
            {"OriginalStatusCode": 500, "OriginalMessage": "crash"},
            (503, "service_unavailable"),
            "failed",
        ),
        (500, "InternalFailure", {}, (503, "service_unavailable"), "failed"),
        (400, "ValidationError", {}, (503, "service_unavailable"), "failed"),
    ],
)
def test_invoke_endpoint_errors_are_clear(
    sm_client: TestClient,
    aws: FakeSageMaker,
    worker: Worker,
    models: list[dict[str, Any]],
    status: int,
    code: str,
    extra: dict[str, Any],
    expected: tuple[int, str],
    fragment: str,
) -> None:
    in_service(sm_client, aws, worker, models[0]["id"])
    inject_errors(backend_of(sm_client).client("sagemaker-runtime"), "InvokeEndpoint", status, code, times=100, **extra)
    response = sm_client.post("/endpoints/sm-ep/invocations", content="1,2", headers=CSV)
    error = assert_error(response, *expected, fragment)
    assert "Traceback" not in error["message"]
    if expected[0] == 503:
        assert "SageMaker endpoint 'sm-ep'" in error["message"]


def test_an_unreadable_or_short_answer_is_a_503(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, models: list[dict[str, Any]]
) -> None:
    in_service(sm_client, aws, worker, models[0]["id"])
    unqueued = sm_client.post("/endpoints/sm-ep/invocations", content="1,2", headers=CSV)  # moto answers "body"
    assert_error(unqueued, 503, "service_unavailable", "unreadable response")
    aws.queue_results({"predictions": [{"closest_cluster": 0.0, "distance_to_cluster": 0.1}]})
    short = sm_client.post("/endpoints/sm-ep/invocations", content="1,2\n3,4", headers=CSV)
    assert_error(short, 503, "service_unavailable", "returned 1 predictions for 2 rows")


def test_failed_endpoint_reports_the_reason_and_can_be_recreated(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, models: list[dict[str, Any]]
) -> None:
    first = models[0]["id"]
    create(sm_client, first)
    poll(worker)
    reason = "The primary container for production variant AllTraffic did not pass the ping health check."
    aws.set_endpoint("sm-ep", "Failed", reason)
    poll(worker)
    failed = endpoint(sm_client)
    assert (failed["status"], failed["failure_reason"]) == ("Failed", reason)
    assert_error(sm_client.post("/endpoints/sm-ep/invocations", content="1,2", headers=CSV), 409, "conflict", "Failed")

    creates = record(backend_of(sm_client).client("sagemaker"), "CreateEndpoint")
    assert sm_client.put("/endpoints/sm-ep", json={"model_id": first}).json()["status"] == "Creating"
    poll(worker)  # a failed SageMaker endpoint cannot be updated: it is deleted ...
    assert "sm-ep" not in aws.state.endpoints and endpoint(sm_client)["status"] == "Creating"
    poll(worker)  # ... and created again
    assert len(creates.params) == 1 and aws.endpoint("sm-ep").endpoint_status == "InService"
    poll(worker)
    recovered = endpoint(sm_client)
    assert (recovered["status"], recovered["failure_reason"]) == ("InService", None)


def test_a_switch_sagemaker_rolls_back_keeps_the_old_model(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, models: list[dict[str, Any]]
) -> None:
    first, second = (m["id"] for m in models)
    in_service(sm_client, aws, worker, first)
    sm_client.put("/endpoints/sm-ep", json={"model_id": second})
    poll(worker)
    aws.roll_back("sm-ep", "Failed to deploy the new configuration: insufficient capacity for ml.m4.xlarge")
    poll(worker)
    kept = endpoint(sm_client)
    assert (kept["status"], kept["model_id"], kept["pending_model_id"]) == ("InService", first, None)
    assert (
        f"switch to model {second} failed" in kept["failure_reason"]
        and "insufficient capacity" in kept["failure_reason"]
    )
    assert missing(aws.sagemaker.describe_model, ModelName=f"sm-ep-{second}")
    assert aws.sagemaker.describe_model(ModelName=f"sm-ep-{first}")["ModelName"] == f"sm-ep-{first}"


def test_a_foreign_sagemaker_endpoint_is_never_touched(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, models: list[dict[str, Any]]
) -> None:
    aws.sagemaker.create_model(
        ModelName="theirs", ExecutionRoleArn=ROLE, PrimaryContainer={"Image": KMEANS_IMAGE_US_EAST_1}
    )
    aws.sagemaker.create_endpoint_config(
        EndpointConfigName="theirs",
        ProductionVariants=[
            {"VariantName": "v", "ModelName": "theirs", "InstanceType": "ml.m4.xlarge", "InitialInstanceCount": 1}
        ],
    )
    aws.sagemaker.create_endpoint(EndpointName="sm-ep", EndpointConfigName="theirs")
    create(sm_client, models[0]["id"])
    poll(worker)
    failed = endpoint(sm_client)
    assert failed["status"] == "Failed" and "not created by this Centroid" in failed["failure_reason"]
    sm_client.delete("/endpoints/sm-ep")
    poll(worker)
    assert_error(sm_client.get("/endpoints/sm-ep"), 404, "not_found")
    assert aws.endpoint("sm-ep").endpoint_config_name == "theirs"
    assert aws.sagemaker.describe_model(ModelName="theirs")["ModelName"] == "theirs"


def test_a_worker_that_died_after_create_endpoint_picks_it_up(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, models: list[dict[str, Any]]
) -> None:
    client = backend_of(sm_client).client("sagemaker")

    def die(**_: Any) -> None:
        raise RuntimeError("worker killed right after CreateEndpoint")

    client.meta.events.register("after-call.sagemaker.CreateEndpoint", die, unique_id="die")
    create(sm_client, models[0]["id"])
    poll(worker)
    assert "sm-ep" in aws.state.endpoints and "endpoint_arn" not in endpoint(sm_client)["remote"]
    client.meta.events.unregister("after-call.sagemaker.CreateEndpoint", unique_id="die")
    creates = record(client, "CreateEndpoint")
    poll(worker)  # found under our naming: followed, not created twice
    assert endpoint(sm_client)["status"] == "InService" and creates.params == []


def test_a_63_character_endpoint_name_fits_sagemaker_names(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, models: list[dict[str, Any]]
) -> None:
    name = "long-" + "x" * 58
    in_service(sm_client, aws, worker, models[0]["id"], name=name)
    config = aws.endpoint(name).endpoint_config_name
    assert len(config) == 63 and config.endswith(f"-{models[0]['id']}")
    assert [m["ModelName"] for m in aws.sagemaker.list_models()["Models"]] == [config]
    sm_client.delete(f"/endpoints/{name}")
    poll(worker)
    assert aws.state.endpoints == {} and aws.sagemaker.list_models()["Models"] == []


def test_delete_waits_until_sagemaker_has_removed_the_endpoint(
    sm_client: TestClient,
    aws: FakeSageMaker,
    worker: Worker,
    models: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def deleting(self: SageMakerModelBackend, endpoint_name: str) -> None:  # SageMaker deletes asynchronously
        self.endpoints[endpoint_name].endpoint_status = "Deleting"

    in_service(sm_client, aws, worker, models[0]["id"])
    monkeypatch.setattr(SageMakerModelBackend, "delete_endpoint", deleting)
    sm_client.delete("/endpoints/sm-ep")
    poll(worker)
    assert endpoint(sm_client)["status"] == "Deleting" and aws.endpoint("sm-ep").endpoint_status == "Deleting"
    assert len(aws.sagemaker.list_models()["Models"]) == 1  # a model in use is not deleted yet
    poll(worker)
    assert endpoint(sm_client)["status"] == "Deleting"
    del aws.state.endpoints["sm-ep"]
    poll(worker)
    assert_error(sm_client.get("/endpoints/sm-ep"), 404, "not_found")
    assert (
        aws.sagemaker.list_endpoint_configs()["EndpointConfigs"] == [] and aws.sagemaker.list_models()["Models"] == []
    )


def test_endpoint_with_a_missing_bucket_fails_clearly(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, models: list[dict[str, Any]]
) -> None:
    aws.s3.delete_bucket(Bucket=BUCKET)
    create(sm_client, models[0]["id"])
    poll(worker)
    failed = endpoint(sm_client)
    assert (failed["status"], failed["failure_reason"]) == (
        "Failed",
        f"S3 bucket '{BUCKET}' does not exist (setting CENTROID_S3_BUCKET)",
    )
    assert aws.state.endpoints == {} and aws.sagemaker.list_models()["Models"] == []
    sm_client.delete("/endpoints/sm-ep")
    poll(worker)
    assert_error(sm_client.get("/endpoints/sm-ep"), 404, "not_found")


def test_backends_report_configuration_without_secrets(sm_client: TestClient, aws: FakeSageMaker) -> None:
    response = sm_client.get("/backends")
    assert response.status_code == 200
    listed = {b["name"]: b for b in response.json()}
    assert listed["local"]["configured"] is True
    sagemaker = listed["sagemaker"]
    assert sagemaker["configured"] is True, sagemaker
    assert sagemaker["settings"]["region"] == "us-east-1" and sagemaker["settings"]["bucket"] == BUCKET
    assert (
        sagemaker["settings"]["role_arn"] == ROLE and sagemaker["settings"]["training_instance_type"] == "ml.c4.8xlarge"
    )
    for secret in (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN):
        assert secret not in response.text

    aws.s3.delete_bucket(Bucket=BUCKET)
    gone = {b["name"]: b for b in sm_client.get("/backends").json()}["sagemaker"]
    assert gone["configured"] is False and f"S3 bucket '{BUCKET}' is not reachable" in gone["detail"]


def test_unconfigured_backend_is_listed_and_refused(settings: Settings, aws: FakeSageMaker) -> None:
    with TestClient(create_app(settings)) as client:
        listed = {b["name"]: b for b in client.get("/backends").json()}["sagemaker"]
        assert listed["configured"] is False
        assert (
            listed["detail"] == "missing settings: CENTROID_AWS_REGION, CENTROID_SAGEMAKER_ROLE_ARN, CENTROID_S3_BUCKET"
        )
        blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
        model = trained_model(client, blobs["id"])
        response = client.post("/endpoints", json={"name": "ep", "model_id": model["id"], "backend": "sagemaker"})
        assert_error(response, 409, "not_configured", "missing settings: CENTROID_AWS_REGION")
        assert client.get("/endpoints").json()["total"] == 0
