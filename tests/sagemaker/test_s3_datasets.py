"""Datasets that already live in S3 (``POST /datasets/s3``), against moto's S3 on 127.0.0.1.

Registration reads schema, row count and summary from the objects (nothing is copied); the local
backend trains by streaming them, SageMaker reads headerless numeric CSV in place or gets the
features converted once; every other operation either reads through the same reader or is refused
with a 409 that says so.
"""

from __future__ import annotations

import io
import json
from typing import Any

import boto3
import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings
from tests.helpers import BLOBS_CSV, assert_error, run_worker_until_idle, upload_csv
from tests.sagemaker.conftest import BUCKET, PREFIX, REGION, FakeSageMaker, backend_of, poll, record
from tests.sagemaker.test_training import CENTERS, complete
from workers.worker import Worker

DATA = "data/blobs/"
FEATURES = ["x", "y"]


def blobs() -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(BLOBS_CSV))


def put(aws: FakeSageMaker, key: str, body: bytes) -> None:
    aws.s3.put_object(Bucket=BUCKET, Key=key, Body=body)


def parquet_bytes(frame: pd.DataFrame, row_group_size: int | None = None) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink, row_group_size=row_group_size)
    return sink.getvalue()


def csv_bytes(frame: pd.DataFrame, header: bool = True) -> bytes:
    return frame.to_csv(index=False, header=header, lineterminator="\n").encode()


def put_csv_parts(aws: FakeSageMaker, prefix: str = DATA, parts: int = 3, header: bool = True) -> pd.DataFrame:
    """BLOBS_CSV cut in ``parts`` CSV objects (plus Spark's empty ``_SUCCESS``)."""
    frame = blobs()
    bounds = np.linspace(0, len(frame), parts + 1).astype(int)
    for index in range(parts):
        put(aws, f"{prefix}part-{index:05d}.csv", csv_bytes(frame.iloc[bounds[index] : bounds[index + 1]], header))
    put(aws, f"{prefix}_SUCCESS", b"")
    return frame


def register(client: TestClient, expect: int = 201, **fields: Any) -> dict[str, Any]:
    body = {"name": "blobs-s3", "uri": f"s3://{BUCKET}/{DATA}", **fields}
    response = client.post("/datasets/s3", json=body)
    assert response.status_code == expect, response.text
    return response.json()  # type: ignore[no-any-return]


def train(client: TestClient, name: str, dataset_id: str, backend: str = "local", **fields: Any) -> dict[str, Any]:
    body = {
        "name": name,
        "train_dataset_id": dataset_id,
        "backend": backend,
        "hyperparameters": {"k": 3, "seed": 7, "init_method": "kmeans++", "mini_batch_size": 16},
        **fields,
    }
    response = client.post("/training-jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def job(client: TestClient, name: str) -> dict[str, Any]:
    return client.get(f"/training-jobs/{name}").json()  # type: ignore[no-any-return]


# --- registration ---------------------------------------------------------------------------------


def test_a_csv_prefix_is_registered_from_its_objects(sm_client: TestClient, aws: FakeSageMaker) -> None:
    frame = put_csv_parts(aws)
    before = aws.keys()
    made = register(sm_client, key_column="id")

    assert made["row_count"] == 60
    assert made["columns"] == [
        {"name": "id", "dtype": "string"},
        {"name": "x", "dtype": "float64"},
        {"name": "y", "dtype": "float64"},
        {"name": "label", "dtype": "string"},
    ]
    assert made["key_column"] == "id"
    assert made["location"] == {
        "uri": f"s3://{BUCKET}/{DATA}",
        "format": "csv",
        "header": True,
        "delimiter": ",",
        "objects": 3,
        "skipped_objects": 1,
        "sagemaker_direct": False,
    }
    assert made["recipe"] == {
        "source": "s3",
        "uri": f"s3://{BUCKET}/{DATA}",
        "format": "csv",
        "columns": ["id", "x", "y", "label"],
    }
    assert made["recipe_summary"]["source"] == "s3"
    assert made["size_bytes"] == sum(
        aws.s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] for key in before if key.endswith(".csv")
    )
    assert aws.keys() == before  # nothing written to S3, nothing copied

    detail = sm_client.get(f"/datasets/{made['id']}").json()
    summary = {entry["name"]: entry for entry in detail["summary"]}
    assert summary["x"]["count"] == 60 and summary["x"]["null_count"] == 0
    assert summary["x"]["min"] == frame["x"].min() and summary["x"]["max"] == frame["x"].max()
    assert summary["x"]["mean"] == pytest.approx(frame["x"].mean())
    assert summary["x"]["std"] == pytest.approx(frame["x"].std())
    assert summary["label"]["min"] == "left" and summary["label"]["max"] == "top"
    listed = sm_client.get("/datasets").json()["items"][0]
    assert listed["location"]["objects"] == 3 and "recipe" not in listed


def test_a_parquet_prefix_is_registered_from_its_footers(sm_client: TestClient, aws: FakeSageMaker) -> None:
    frame = blobs()
    frame["n"] = np.arange(60, dtype=np.int32)
    put(aws, f"{DATA}a.parquet", parquet_bytes(frame.iloc[:25], row_group_size=10))
    put(aws, f"{DATA}nested/b.parquet", parquet_bytes(frame.iloc[25:]))
    made = register(sm_client)

    assert made["row_count"] == 60
    assert made["columns"] == [
        {"name": "id", "dtype": "string"},
        {"name": "x", "dtype": "float64"},
        {"name": "y", "dtype": "float64"},
        {"name": "label", "dtype": "string"},
        {"name": "n", "dtype": "int64"},
    ]
    assert made["location"]["format"] == "parquet" and made["location"]["objects"] == 2
    assert made["location"]["header"] is None and made["location"]["sagemaker_direct"] is False
    summary = {entry["name"]: entry for entry in sm_client.get(f"/datasets/{made['id']}").json()["summary"]}
    assert (summary["n"]["min"], summary["n"]["max"], summary["n"]["count"]) == (0.0, 59.0, 60)
    assert summary["id"]["min"] == "a0" and summary["id"]["max"] == "c9"
    assert summary["x"]["mean"] is None  # footers give no means; reading every row would


def test_headerless_numeric_csv_is_marked_for_sagemaker(sm_client: TestClient, aws: FakeSageMaker) -> None:
    put_csv_parts(aws, header=False)  # id,x,y,label without a header: not all numbers
    mixed = register(sm_client, header=False, columns=["id", "x", "y", "label"])
    assert mixed["row_count"] == 60 and mixed["location"]["sagemaker_direct"] is False

    numeric = blobs()[FEATURES]
    put(aws, "data/numeric/part-0.csv", csv_bytes(numeric.iloc[:30], header=False))
    put(aws, "data/numeric/part-1.csv", csv_bytes(numeric.iloc[30:], header=False))
    auto = register(sm_client, uri=f"s3://{BUCKET}/data/numeric")  # no trailing slash: a prefix all the same
    assert auto["location"]["uri"] == f"s3://{BUCKET}/data/numeric/"
    assert auto["location"]["header"] is False and auto["location"]["sagemaker_direct"] is True
    assert [c["name"] for c in auto["columns"]] == ["f0", "f1"] and auto["row_count"] == 60
    named = register(sm_client, uri=f"s3://{BUCKET}/data/numeric/", header=False, columns=FEATURES)
    assert [c["name"] for c in named["columns"]] == FEATURES


def test_a_column_holding_text_further_on_is_text(sm_client: TestClient, aws: FakeSageMaker) -> None:
    head = "a,b\n" + "".join(f"{i},{i}.5\n" for i in range(40_000))  # more than the inference sample
    put(aws, f"{DATA}a.csv", (head + "7,n/a\n").encode())
    made = register(sm_client)
    assert made["columns"] == [{"name": "a", "dtype": "int64"}, {"name": "b", "dtype": "string"}]
    assert made["row_count"] == 40_001


@pytest.mark.parametrize(
    ("objects", "fields", "fragment", "reason"),
    [
        ({}, {}, "nothing found", "not_found"),
        ({"_SUCCESS": b"", "empty.csv": b""}, {}, "no data objects", "no_objects"),
        ({"a.csv": b"x\n1\n", "b.parquet": b"PAR1"}, {}, "mixes CSV", "mixed_formats"),
        ({"a.csv": b"x\n1\n"}, {"format": "parquet"}, "holds csv objects", "mixed_formats"),
        ({"a.csv.gz": b"\x1f\x8b"}, {}, "compressed", "compressed"),
        ({"a.bin": b"x\n1\n"}, {}, "cannot tell the format", "unknown_format"),
        ({"a.csv": b"x,y\n1,2\n", "b.csv": b"x,z\n1,2\n"}, {}, "headers differ", "schemas_differ"),
    ],
)
def test_registration_errors(
    sm_client: TestClient,
    aws: FakeSageMaker,
    objects: dict[str, bytes],
    fields: dict[str, Any],
    fragment: str,
    reason: str,
) -> None:
    for name, body in objects.items():
        put(aws, f"{DATA}{name}", body)
    error = assert_error(
        sm_client.post("/datasets/s3", json={"name": "x", "uri": f"s3://{BUCKET}/{DATA}", **fields}),
        400,
        "invalid_input",
        fragment,
    )
    assert error["details"]["reason"] == reason
    assert sm_client.get("/datasets").json()["total"] == 0


def test_parquet_objects_with_other_schemas_are_refused(sm_client: TestClient, aws: FakeSageMaker) -> None:
    put(aws, f"{DATA}a.parquet", parquet_bytes(pd.DataFrame({"x": [1.0], "y": [2.0]})))
    put(aws, f"{DATA}b.parquet", parquet_bytes(pd.DataFrame({"x": [1.0], "y": ["text"]})))
    error = assert_error(
        sm_client.post("/datasets/s3", json={"name": "x", "uri": f"s3://{BUCKET}/{DATA}"}),
        400,
        "invalid_input",
        "schemas differ",
    )
    assert error["details"]["reason"] == "schemas_differ"
    assert "y (float64)" in error["message"] and "y (string)" in error["message"]


def test_missing_bucket_bad_values_and_too_many_objects(
    sm_client: TestClient, aws: FakeSageMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = sm_client.post("/datasets/s3", json={"name": "x", "uri": "s3://no-such-bucket-here/data/"})
    assert assert_error(missing, 400, "invalid_input", "does not exist")["details"]["reason"] == "no_such_bucket"

    put(aws, f"{DATA}a.csv", b"x,y\n1,2\n3,inf\n")
    error = assert_error(
        sm_client.post("/datasets/s3", json={"name": "x", "uri": f"s3://{BUCKET}/{DATA}"}),
        400,
        "invalid_input",
        "non-finite",
    )
    assert error["details"] == {"object": f"s3://{BUCKET}/{DATA}a.csv", "column": "y", "row": 1}

    import service.datasets.s3 as s3_module

    monkeypatch.setattr(s3_module, "MAX_S3_OBJECTS", 2)
    for index in range(3):
        put(aws, f"data/many/{index}.csv", b"x\n1\n")
    too_many = sm_client.post("/datasets/s3", json={"name": "x", "uri": f"s3://{BUCKET}/data/many/"})
    details = assert_error(too_many, 400, "invalid_input", "at most 2")["details"]
    assert (details["objects"], details["max_objects"], details["reason"]) == (3, 2, "too_many")


def test_request_shapes_are_checked(sm_client: TestClient, aws: FakeSageMaker) -> None:
    for body in (
        {"name": "x", "uri": "https://bucket/data/"},
        {"name": "x", "uri": f"s3://{BUCKET}/{DATA}", "format": "parquet", "header": True},
        {"name": "x", "uri": f"s3://{BUCKET}/{DATA}", "columns": ["a"]},  # columns without header: false
        {"name": "x", "uri": f"s3://{BUCKET}/{DATA}", "surprise": 1},
    ):
        assert_error(sm_client.post("/datasets/s3", json=body), 422, "validation_error")
    put_csv_parts(aws)
    assert_error(
        sm_client.post("/datasets/s3", json={"name": "x", "uri": f"s3://{BUCKET}/{DATA}", "key_column": "nope"}),
        400,
        "invalid_input",
        "key column 'nope'",
    )


def test_without_a_region_s3_datasets_are_refused_before_any_call(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        response = client.post("/datasets/s3", json={"name": "x", "uri": "s3://some-bucket/data/"})
    assert_error(response, 409, "not_configured", "CENTROID_AWS_REGION")


def test_access_denied_is_said_plainly(sm_client: TestClient, aws: FakeSageMaker) -> None:
    put_csv_parts(aws)
    with _as_reader(aws):
        response = sm_client.post("/datasets/s3", json={"name": "x", "uri": f"s3://{BUCKET}/{DATA}"})
    error = assert_error(response, 400, "invalid_input", "refused access")
    assert error["details"]["reason"] == "access_denied"
    assert "s3:ListBucket" in error["message"]


class _as_reader:  # noqa: N801 - used as a context manager
    """The ``iam_reader`` arrangement for the duration of a ``with`` block."""

    def __init__(self, aws: FakeSageMaker) -> None:
        self.aws = aws
        self.patch = pytest.MonkeyPatch()

    def __enter__(self) -> None:
        iam = boto3.client("iam", endpoint_url=self.aws.url, region_name=REGION)
        iam.create_user(UserName="centroid-reader")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="centroid-reader", PolicyName="read", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="centroid-reader")["AccessKey"]
        self.patch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        self.patch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        self.patch.delenv("AWS_SESSION_TOKEN", raising=False)
        httpx.post(f"{self.aws.url}/moto-api/reset-auth", content=b"0", timeout=10).raise_for_status()

    def __exit__(self, *_: object) -> None:
        httpx.post(f"{self.aws.url}/moto-api/reset-auth", content=b"inf", timeout=10).raise_for_status()
        self.patch.undo()


# --- reading, and what is refused ----------------------------------------------------------------


def test_rows_and_csv_download_read_the_objects(sm_client: TestClient, aws: FakeSageMaker) -> None:
    frame = put_csv_parts(aws)
    made = register(sm_client, key_column="id")
    rows = sm_client.get(f"/datasets/{made['id']}/rows", params={"offset": 18, "limit": 5}).json()
    assert rows["total"] == 60 and rows["columns"] == ["id", "x", "y", "label"]
    assert rows["rows"] == frame.iloc[18:23].astype(object).to_numpy().tolist()  # crosses an object boundary
    assert sm_client.get(f"/datasets/{made['id']}/rows", params={"offset": 60}).json()["rows"] == []

    response = sm_client.get(f"/datasets/{made['id']}/csv")
    assert response.status_code == 200
    pd.testing.assert_frame_equal(pd.read_csv(io.BytesIO(response.content)), frame)

    parquet_frame = frame.assign(n=np.arange(60))
    put(aws, "data/pq/a.parquet", parquet_bytes(parquet_frame))
    stored = register(sm_client, uri=f"s3://{BUCKET}/data/pq/")
    downloaded = sm_client.get(f"/datasets/{stored['id']}/csv")
    pd.testing.assert_frame_equal(pd.read_csv(io.BytesIO(downloaded.content)), parquet_frame)


def test_reading_objects_that_are_gone_is_a_plain_error(sm_client: TestClient, aws: FakeSageMaker) -> None:
    put_csv_parts(aws)
    made = register(sm_client)
    aws.s3.delete_object(Bucket=BUCKET, Key=f"{DATA}part-00000.csv")
    error = assert_error(sm_client.get(f"/datasets/{made['id']}/csv"), 400, "invalid_input", "gone")
    assert error["details"]["reason"] == "not_found"
    put(aws, f"{DATA}part-00000.csv", b"id,x,y,label\nz,1,1,q\n")  # now one row: the data changed
    changed = assert_error(sm_client.get(f"/datasets/{made['id']}/rows"), 400, "invalid_input", "register it again")
    assert changed["details"]["reason"] == "data_changed"


def test_derive_is_refused_and_delete_leaves_the_objects(sm_client: TestClient, aws: FakeSageMaker) -> None:
    put_csv_parts(aws)
    made = register(sm_client, key_column="id")
    steps = [{"op": "scale", "columns": ["x"]}]
    error = assert_error(
        sm_client.post(f"/datasets/{made['id']}/derive", json={"name": "d", "steps": steps}), 409, "conflict", "S3"
    )
    assert error["details"]["reason"] == "dataset_in_s3"
    assert_error(
        sm_client.post(
            f"/datasets/{made['id']}/derive",
            json={"name": "d", "steps": steps},
            headers={"Prefer": "respond-async"},
        ),
        409,
        "conflict",
        "S3",
    )
    stored = upload_csv(sm_client, "stored", BLOBS_CSV, "id")
    join = [{"op": "join", "dataset_id": made["id"]}]
    assert_error(
        sm_client.post(f"/datasets/{stored['id']}/derive", json={"name": "j", "steps": join}), 409, "conflict", "S3"
    )

    keys = aws.keys()
    assert sm_client.delete(f"/datasets/{made['id']}").status_code == 204
    assert sm_client.get(f"/datasets/{made['id']}").status_code == 404
    assert aws.keys() == keys


# --- training on a dataset in S3 ----------------------------------------------------------------


def centroids_of(client: TestClient, job_name: str) -> np.ndarray:
    model_id = job(client, job_name)["model_id"]
    assert model_id, job(client, job_name)
    return np.array(client.get(f"/models/{model_id}/centroids").json()["centroids"])


def test_the_local_backend_trains_on_objects_as_on_the_same_data_uploaded(
    sm_client: TestClient, aws: FakeSageMaker
) -> None:
    """Streamed from three CSV objects, or from a Parquet object of small row groups: the same rows
    in the same batches, so the same model for the same seed as the uploaded copy."""
    frame = put_csv_parts(aws)
    in_csv = register(sm_client, key_column="id")
    put(aws, "data/pq/a.parquet", parquet_bytes(frame.iloc[:25], row_group_size=7))
    put(aws, "data/pq/b.parquet", parquet_bytes(frame.iloc[25:], row_group_size=7))
    in_parquet = register(sm_client, uri=f"s3://{BUCKET}/data/pq/", key_column="id")
    uploaded = upload_csv(sm_client, "uploaded", BLOBS_CSV, "id")
    for name, dataset in (("from-csv", in_csv), ("from-parquet", in_parquet), ("from-upload", uploaded)):
        train(sm_client, name, dataset["id"], feature_columns=FEATURES)
    run_worker_until_idle(sm_client.app)
    expected = centroids_of(sm_client, "from-upload")
    np.testing.assert_array_equal(centroids_of(sm_client, "from-csv"), expected)
    np.testing.assert_array_equal(centroids_of(sm_client, "from-parquet"), expected)
    assert job(sm_client, "from-csv")["status"] == "Completed"
    assert aws.keys(PREFIX) == []  # the local backend copies nothing to S3


def test_a_local_training_on_objects_that_changed_fails_naming_them(sm_client: TestClient, aws: FakeSageMaker) -> None:
    put_csv_parts(aws)
    made = register(sm_client, key_column="id")
    put(aws, f"{DATA}part-00001.csv", b"id,x,y,label\nz,1,1,q\n")  # one row where 20 were registered
    train(sm_client, "changed", made["id"], feature_columns=FEATURES)
    run_worker_until_idle(sm_client.app)
    failed = job(sm_client, "changed")
    assert failed["status"] == "Failed"
    assert "part-00001.csv" in failed["failure_reason"], failed["failure_reason"]


def test_features_with_nulls_in_s3_are_refused_at_creation(sm_client: TestClient, aws: FakeSageMaker) -> None:
    put(aws, f"{DATA}a.csv", b"x,y\n1,2\n3,\n5,6\n")
    made = register(sm_client)
    response = sm_client.post(
        "/training-jobs", json={"name": "holes", "train_dataset_id": made["id"], "hyperparameters": {"k": 2}}
    )
    error = assert_error(response, 400, "invalid_input", "nulls")
    assert error["details"]["null_counts"] == {"y": 1}


def put_numeric_parts(aws: FakeSageMaker, prefix: str = "data/numeric/") -> None:
    numeric = blobs()[FEATURES]
    for index, (start, stop) in enumerate(((0, 20), (20, 40), (40, 60))):
        put(aws, f"{prefix}part-{index}.csv", csv_bytes(numeric.iloc[start:stop], header=False))
    put(aws, f"{prefix}_SUCCESS", b"")


def test_sagemaker_reads_headerless_numeric_csv_in_place(sm_client: TestClient, aws: FakeSageMaker) -> None:
    """No copy: a manifest lists exactly the registered objects (not _SUCCESS); one instance per object."""
    worker = Worker(sm_client.app.state.centroid, worker_id="sm-worker-1")  # type: ignore[attr-defined]
    creates = record(backend_of(sm_client).client("sagemaker"), "CreateTrainingJob")
    put_numeric_parts(aws)
    made = register(sm_client, uri=f"s3://{BUCKET}/data/numeric/", header=False, columns=FEATURES)
    assert made["location"]["sagemaker_direct"] is True
    train(sm_client, "direct", made["id"], backend="sagemaker", resource_config={"instance_count": 5})
    poll(worker)
    submitted = job(sm_client, "direct")
    assert submitted["status"] == "InProgress", submitted
    assert aws.keys(f"{PREFIX}/direct/") == [f"{PREFIX}/direct/train.manifest"]  # no data copied
    manifest = json.loads(aws.get(f"{PREFIX}/direct/train.manifest"))
    assert manifest == [{"prefix": f"s3://{BUCKET}/"}, *(f"data/numeric/part-{i}.csv" for i in range(3))]
    channel = creates.params[0]["InputDataConfig"][0]["DataSource"]["S3DataSource"]
    assert channel == {
        "S3DataType": "ManifestFile",
        "S3Uri": f"s3://{BUCKET}/{PREFIX}/direct/train.manifest",
        "S3DataDistributionType": "ShardedByS3Key",
    }
    assert creates.params[0]["ResourceConfig"]["InstanceCount"] == 3
    assert submitted["remote"]["instance_count_requested"] == 5
    assert submitted["remote"]["train_data"] == "direct" and "read in place" in submitted["status_message"]

    # the full-pass metrics are computed from the objects too
    complete(aws, "direct")
    poll(worker, 2)
    done = job(sm_client, "direct")
    assert done["status"] == "Completed", done
    metrics = sm_client.get(f"/models/{done['model_id']}").json()["metrics"]
    features = blobs()[FEATURES].to_numpy()
    distances = ((features[:, None, :] - CENTERS[None]) ** 2).sum(axis=2).min(axis=1)
    assert metrics["train:msd_full_pass"] == pytest.approx(distances.mean())


def test_sagemaker_gets_other_data_in_s3_converted_once(sm_client: TestClient, aws: FakeSageMaker) -> None:
    """CSV with a header, a key and a text column: the job's features are written as headerless CSV."""
    worker = Worker(sm_client.app.state.centroid, worker_id="sm-worker-1")  # type: ignore[attr-defined]
    frame = put_csv_parts(aws)
    made = register(sm_client, key_column="id")
    assert made["location"]["sagemaker_direct"] is False
    train(sm_client, "converted", made["id"], backend="sagemaker", feature_columns=["y", "x"])
    poll(worker)
    converted = job(sm_client, "converted")
    assert converted["status"] == "InProgress" and converted["remote"]["train_data"] == "converted"
    written = aws.get(f"{PREFIX}/converted/train/data.csv").decode()
    np.testing.assert_array_equal(np.loadtxt(io.StringIO(written), delimiter=","), frame[["y", "x"]].to_numpy())

    # headerless numeric objects, but the job wants the columns in another order: converted too
    put_numeric_parts(aws)
    numeric = register(sm_client, uri=f"s3://{BUCKET}/data/numeric/", header=False, columns=FEATURES)
    train(sm_client, "reordered", numeric["id"], backend="sagemaker", feature_columns=["y", "x"])
    poll(worker)
    assert f"{PREFIX}/reordered/train/data.csv" in aws.keys(f"{PREFIX}/reordered/")


def test_sagemaker_refuses_objects_that_changed_since_registration(sm_client: TestClient, aws: FakeSageMaker) -> None:
    worker = Worker(sm_client.app.state.centroid, worker_id="sm-worker-1")  # type: ignore[attr-defined]
    put_numeric_parts(aws)
    made = register(sm_client, uri=f"s3://{BUCKET}/data/numeric/", header=False, columns=FEATURES)
    put(aws, "data/numeric/part-1.csv", b"1,2\n")
    train(sm_client, "stale", made["id"], backend="sagemaker")
    poll(worker)
    failed = job(sm_client, "stale")
    assert failed["status"] == "Failed", failed
    assert "data/numeric/part-1.csv changed since the dataset was registered" in failed["failure_reason"]
    assert "stale" not in aws.state.training_jobs


def test_predictions_and_assignments_for_a_dataset_in_s3_are_refused(sm_client: TestClient, aws: FakeSageMaker) -> None:
    put_csv_parts(aws)
    made = register(sm_client, key_column="id")
    train(sm_client, "model-job", made["id"], feature_columns=FEATURES)
    run_worker_until_idle(sm_client.app)
    model_id = job(sm_client, "model-job")["model_id"]
    response = sm_client.get(f"/models/{model_id}/assignments")
    error = assert_error(response, 409, "conflict", "stays in S3")
    assert error["details"]["reason"] == "dataset_in_s3"
