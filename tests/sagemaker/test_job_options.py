"""Job options (issue 13, part 5): volume size, managed spot training, checkpoints, VPC, KMS keys,
input mode, and the cost fields, against moto playing SageMaker.

What is checked: each option reaches CreateTrainingJob exactly as SageMaker's API names it (and
moto, which stores and echoes these fields without judging them, gives them back from
DescribeTrainingJob); what SageMaker would refuse is refused at creation (422 for a malformed
value, 400 naming the option for a rule between options), on both backends; the local backend
refuses the options it cannot honour and lists the ones it ignores; the spot saving is SageMaker's
console figure.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.helpers import BLOBS_CSV, assert_error, upload_csv
from tests.sagemaker.conftest import FakeSageMaker, backend_of, poll, record
from tests.sagemaker.test_training import complete, job
from workers.worker import Worker

KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
ALIAS = "alias/centroid-models"
VPC = {"security_group_ids": ["sg-0123456789abcdef0"], "subnets": ["subnet-0123456789abcdef0", "subnet-89abcdef"]}
ALL_OPTIONS: dict[str, Any] = {
    "instance_type": "ml.m5.xlarge",
    "instance_count": 2,
    "volume_size_gb": 50,
    "volume_kms_key_id": KEY_ARN,
    "output_kms_key_id": ALIAS,
    "enable_managed_spot_training": True,
    "max_runtime_seconds": 1800,
    "max_wait_seconds": 3600,
    "checkpoint_s3_uri": "s3://my-checkpoints/centroid/sm-job",
    "vpc_config": VPC,
    "input_mode": "Pipe",
}


def body(dataset_id: str, backend: str = "sagemaker", name: str = "sm-job", **options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "train_dataset_id": dataset_id,
        "backend": backend,
        "hyperparameters": {"k": 3},
        "resource_config": options,
    }


@pytest.fixture
def dataset(sm_client: TestClient) -> str:
    return str(upload_csv(sm_client, "blobs", BLOBS_CSV, "id")["id"])


def create(client: TestClient, dataset_id: str, backend: str = "sagemaker", **options: Any) -> dict[str, Any]:
    response = client.post("/training-jobs", json=body(dataset_id, backend, **options))
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def test_every_option_reaches_create_training_job_as_sent(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, dataset: str
) -> None:
    creates = record(backend_of(sm_client).client("sagemaker"), "CreateTrainingJob")
    created = create(sm_client, dataset, **ALL_OPTIONS)
    assert created["resource_config"] == ALL_OPTIONS
    assert created["ignored_options"] == [] and created["spot_savings_percent"] is None
    poll(worker)
    assert job(sm_client)["status"] == "InProgress"

    sent = creates.params[0]
    assert sent["AlgorithmSpecification"]["TrainingInputMode"] == "Pipe"
    assert sent["ResourceConfig"] == {
        "InstanceType": "ml.m5.xlarge",
        "InstanceCount": 2,
        "VolumeSizeInGB": 50,
        "VolumeKmsKeyId": KEY_ARN,
    }
    assert sent["OutputDataConfig"]["KmsKeyId"] == ALIAS
    assert sent["StoppingCondition"] == {"MaxRuntimeInSeconds": 1800, "MaxWaitTimeInSeconds": 3600}
    assert sent["EnableManagedSpotTraining"] is True
    assert sent["CheckpointConfig"] == {"S3Uri": "s3://my-checkpoints/centroid/sm-job"}
    assert sent["VpcConfig"] == {
        "SecurityGroupIds": ["sg-0123456789abcdef0"],
        "Subnets": ["subnet-0123456789abcdef0", "subnet-89abcdef"],
    }
    # Pipe mode reads the same CSV channel (KMeans streams CSV and recordIO-protobuf alike)
    assert [c["ContentType"] for c in sent["InputDataConfig"]] == ["text/csv;label_size=0"]

    # SageMaker (moto) received them, and DescribeTrainingJob gives them back
    described = aws.sagemaker.describe_training_job(TrainingJobName="sm-job")
    assert described["ResourceConfig"] == sent["ResourceConfig"]
    assert described["OutputDataConfig"]["KmsKeyId"] == ALIAS
    assert described["StoppingCondition"] == sent["StoppingCondition"]
    assert described["EnableManagedSpotTraining"] is True
    assert described["CheckpointConfig"] == sent["CheckpointConfig"]
    assert described["VpcConfig"] == sent["VpcConfig"]
    assert described["AlgorithmSpecification"]["TrainingInputMode"] == "Pipe"


def test_without_options_nothing_new_is_sent(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, dataset: str
) -> None:
    creates = record(backend_of(sm_client).client("sagemaker"), "CreateTrainingJob")
    created = create(sm_client, dataset)
    assert created["resource_config"] == {} and created["ignored_options"] == []
    poll(worker)
    sent = creates.params[0]
    assert not {"EnableManagedSpotTraining", "CheckpointConfig", "VpcConfig"} & set(sent)
    assert sent["ResourceConfig"] == {"InstanceType": "ml.c4.8xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30}
    assert sent["OutputDataConfig"] == {"S3OutputPath": "s3://centroid-test-bucket/centroid-test/sm-job/output"}
    assert sent["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400}
    assert sent["AlgorithmSpecification"]["TrainingInputMode"] == "File"


def test_spot_training_fills_in_sagemakers_limits(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, dataset: str
) -> None:
    """MaxWaitTimeInSeconds defaults to 3600 (KMeans' ceiling) and MaxRuntimeInSeconds to the
    setting capped by it: the job response shows the values sent."""
    creates = record(backend_of(sm_client).client("sagemaker"), "CreateTrainingJob")
    created = create(sm_client, dataset, enable_managed_spot_training=True)
    assert created["resource_config"] == {
        "enable_managed_spot_training": True,
        "max_wait_seconds": 3600,
        "max_runtime_seconds": 3600,
    }
    poll(worker)
    assert creates.params[0]["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 3600}
    assert creates.params[0]["EnableManagedSpotTraining"] is True


def test_the_spot_saving_is_sagemakers_console_figure(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, dataset: str
) -> None:
    create(sm_client, dataset, enable_managed_spot_training=True, max_runtime_seconds=600, max_wait_seconds=1200)
    poll(worker)
    assert job(sm_client)["spot_savings_percent"] is None  # nothing reported yet
    complete(aws)  # TrainingTimeInSeconds 187, BillableTimeInSeconds 161
    poll(worker)
    done = job(sm_client)
    assert (done["status"], done["training_seconds"], done["billable_seconds"]) == ("Completed", 187, 161)
    assert done["spot_savings_percent"] == round(100 * (1 - 161 / 187), 2) == 13.9


def test_no_spot_saving_without_spot_training(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, dataset: str
) -> None:
    create(sm_client, dataset)
    poll(worker)
    complete(aws)
    poll(worker)
    done = job(sm_client)
    assert done["billable_seconds"] == 161 and done["spot_savings_percent"] is None


@pytest.mark.parametrize("backend", ["sagemaker", "local"])
@pytest.mark.parametrize(
    ("options", "option", "fragment"),
    [
        ({"input_mode": "FastFile"}, "input_mode", "SageMaker's KMeans trains in File or Pipe mode only, not FastFile"),
        ({"max_wait_seconds": 3600}, "max_wait_seconds", "applies to managed spot training only"),
        (
            {"enable_managed_spot_training": True, "max_wait_seconds": 7200},
            "max_wait_seconds",
            "must be <= 3600 for SageMaker's KMeans (a built-in algorithm without checkpoints), got 7200",
        ),
        (
            {"enable_managed_spot_training": True, "max_runtime_seconds": 3000, "max_wait_seconds": 2000},
            "max_runtime_seconds",
            "must be <= max_wait_seconds (2000)",
        ),
        (
            {"enable_managed_spot_training": True, "max_runtime_seconds": 7200},  # the wait defaults to 3600
            "max_runtime_seconds",
            "must be <= max_wait_seconds (3600)",
        ),
        (
            {"instance_type": "ml.g4dn.xlarge", "volume_kms_key_id": KEY_ARN},
            "volume_kms_key_id",
            "not with ml.g4dn.xlarge: its local NVMe storage is encrypted by the hardware",
        ),
    ],
)
def test_what_sagemaker_refuses_is_a_400_naming_the_option_on_both_backends(
    sm_client: TestClient,
    aws: FakeSageMaker,
    dataset: str,
    backend: str,
    options: dict,
    option: str,
    fragment: str,  # type: ignore[type-arg]
) -> None:
    response = sm_client.post("/training-jobs", json=body(dataset, backend, **options))
    error = assert_error(response, 400, "invalid_input", f"resource_config.{option}: {fragment}")
    assert error["details"][0]["option"] == option and fragment in error["details"][0]["message"]
    assert sm_client.get("/training-jobs").json()["total"] == 0


def test_every_problem_is_named_at_once(sm_client: TestClient, aws: FakeSageMaker, dataset: str) -> None:
    options = {"input_mode": "FastFile", "max_wait_seconds": 600}
    error = assert_error(sm_client.post("/training-jobs", json=body(dataset, **options)), 400, "invalid_input")
    assert [d["option"] for d in error["details"]] == ["input_mode", "max_wait_seconds"]


@pytest.mark.parametrize(
    ("options", "loc"),
    [
        ({"volume_size_gb": 0}, ["volume_size_gb"]),
        ({"volume_size_gb": 16385}, ["volume_size_gb"]),
        ({"volume_kms_key_id": "not-a-key"}, ["volume_kms_key_id"]),
        ({"volume_kms_key_id": ALIAS}, ["volume_kms_key_id"]),  # aliases only for the output key
        ({"volume_kms_key_id": KEY_ARN.replace(":kms:", ":s3:")}, ["volume_kms_key_id"]),
        ({"output_kms_key_id": "alias/with space"}, ["output_kms_key_id"]),
        ({"output_kms_key_id": "arn:aws:kms:us-east-1:12345:key/x"}, ["output_kms_key_id"]),
        ({"max_wait_seconds": 59}, ["max_wait_seconds"]),
        ({"max_runtime_seconds": 28 * 24 * 3600 + 1}, ["max_runtime_seconds"]),
        ({"checkpoint_s3_uri": "/local/path"}, ["checkpoint_s3_uri"]),
        ({"checkpoint_s3_uri": "s3://Bad_Bucket/x"}, ["checkpoint_s3_uri"]),
        ({"input_mode": "Stream"}, ["input_mode"]),
        ({"vpc_config": {"security_group_ids": ["sg-12"], "subnets": ["subnet-0123abcd"]}}, ["vpc_config"]),
        ({"vpc_config": {"security_group_ids": ["sg-0123abcd"], "subnets": ["vpc-0123abcd"]}}, ["vpc_config"]),
        ({"vpc_config": {"security_group_ids": [], "subnets": ["subnet-0123abcd"]}}, ["vpc_config"]),
        ({"vpc_config": {"security_group_ids": ["sg-0123abcd"] * 6, "subnets": ["subnet-0123abcd"]}}, ["vpc_config"]),
        ({"vpc_config": {"subnets": ["subnet-0123abcd"]}}, ["vpc_config"]),
        ({"use_spot_instances": True}, ["use_spot_instances"]),  # the SDK's name: unknown here, not ignored
    ],
)
def test_malformed_options_are_422_naming_the_field(
    sm_client: TestClient,
    aws: FakeSageMaker,
    dataset: str,
    options: dict,
    loc: list[str],  # type: ignore[type-arg]
) -> None:
    error = assert_error(sm_client.post("/training-jobs", json=body(dataset, **options)), 422, "validation_error")
    assert any(d["loc"][:3] == ["body", "resource_config", *loc] for d in error["details"]), error["details"]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("volume_kms_key_id", "1234abcd-12ab-34cd-56ef-1234567890ab"),
        ("volume_kms_key_id", "mrk-1234abcd12ab34cd56ef1234567890ab"),
        ("volume_kms_key_id", "arn:aws-us-gov:kms:us-gov-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"),
        ("output_kms_key_id", "1234abcd-12ab-34cd-56ef-1234567890ab"),
        ("output_kms_key_id", KEY_ARN),
        ("output_kms_key_id", "alias/aws/sagemaker"),
        ("output_kms_key_id", "arn:aws-cn:kms:cn-north-1:123456789012:alias/team/models"),
        ("checkpoint_s3_uri", "https://my-bucket.s3.amazonaws.com/checkpoints"),
        ("checkpoint_s3_uri", "s3://my.bucket"),
    ],
)
def test_every_documented_format_is_accepted(
    sm_client: TestClient, aws: FakeSageMaker, dataset: str, option: str, value: str
) -> None:
    assert create(sm_client, dataset, **{option: value})["resource_config"] == {option: value}


# --- the local backend ----------------------------------------------------------------------------


def test_local_refuses_the_options_it_cannot_honour(sm_client: TestClient, aws: FakeSageMaker, dataset: str) -> None:
    options = {"vpc_config": VPC, "volume_kms_key_id": KEY_ARN, "output_kms_key_id": ALIAS}
    error = assert_error(
        sm_client.post("/training-jobs", json=body(dataset, "local", **options)),
        400,
        "invalid_input",
        "resource_config.vpc_config: the local backend trains in the worker's process, not in your VPC",
    )
    assert [d["option"] for d in error["details"]] == ["vpc_config", "volume_kms_key_id", "output_kms_key_id"]


def test_local_ignores_the_others_and_lists_them(
    sm_client: TestClient, aws: FakeSageMaker, worker: Worker, dataset: str
) -> None:
    portable = {
        k: v for k, v in ALL_OPTIONS.items() if k not in ("vpc_config", "volume_kms_key_id", "output_kms_key_id")
    }
    created = create(sm_client, dataset, "local", **portable)
    assert created["ignored_options"] == sorted(portable)
    assert created["resource_config"] == portable
    poll(worker)
    done = job(sm_client)
    assert done["status"] == "Completed" and done["model_id"], done
    assert done["ignored_options"] == sorted(portable) and done["spot_savings_percent"] is None
    assert aws.state.training_jobs == {}  # nothing went to SageMaker


# --- the OpenAPI document -----------------------------------------------------------------------


def test_the_options_are_documented_in_the_openapi_document(settings: Settings) -> None:
    from service.main import create_app

    schemas = create_app(settings).openapi()["components"]["schemas"]
    options = schemas["ResourceConfig"]
    assert options["additionalProperties"] is False and options["examples"]
    for name, prop in options["properties"].items():
        assert prop.get("description"), name
        if name != "vpc_config":
            assert prop.get("examples"), name
    patterns = {
        name: next(p.get("pattern") for p in options["properties"][name]["anyOf"] if p.get("type") == "string")
        for name in ("volume_kms_key_id", "output_kms_key_id", "checkpoint_s3_uri")
    }
    assert all(p.startswith("^") and p.endswith("$") for p in patterns.values()), patterns
    vpc = schemas["VpcConfig"]
    assert vpc["required"] == ["security_group_ids", "subnets"]
    assert vpc["properties"]["subnets"]["items"]["pattern"] == "^subnet-[0-9a-f]{8}(?:[0-9a-f]{9})?$"
    job = schemas["TrainingJob"]["properties"]
    assert job["ignored_options"]["description"] and job["spot_savings_percent"]["description"]
