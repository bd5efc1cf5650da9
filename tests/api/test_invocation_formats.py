"""SageMaker KMeans's inference formats: sparse and vector JSON instances, and RecordIO-protobuf.

The RecordIO-protobuf requests are built here, independently of the server's code: the
``aialgs.data.Record`` schema (the SageMaker SDK's ``record.proto``) is written below as a
text-format ``FileDescriptorProto`` and compiled by the ``protobuf`` package into message classes of
this module's own descriptor pool; the framing (magic ``0xced7230a``, a length word whose upper
3 bits are the continuation flag, padding to 4 bytes) and the dmlc-style split of a payload that
holds the magic are written here from the format's description. Responses are read back with the
same independent classes.

Most API tests share one deployed endpoint (``ep``, a model of the two-feature blobs) on SQLite:
these formats do not depend on the database.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from fastapi.testclient import TestClient
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.endpoints import recordio
from service.endpoints.invocations import parse_features
from service.errors import InvalidInput
from service.fast_lane import FastLane
from service.main import create_app
from service.settings import Settings
from tests.helpers import BLOBS_CSV, assert_error, deployed, trained_model, upload_csv

RECORDIO = "application/x-recordio-protobuf"
INVOKE = "/endpoints/ep/invocations"

# --- an independent encoder/decoder: the documented schema, compiled by protobuf -----------------------------

_TENSOR_FIELDS = """
  field {{ name: "values" number: 1 label: LABEL_REPEATED type: {value_type} options {{ packed: true }} }}
  field {{ name: "keys" number: 2 label: LABEL_REPEATED type: TYPE_UINT64 options {{ packed: true }} }}
  field {{ name: "shape" number: 3 label: LABEL_REPEATED type: TYPE_UINT64 options {{ packed: true }} }}
"""
_MAP_ENTRY = """
  nested_type {{
    name: "{name}"
    field {{ name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }}
    field {{ name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".aialgs.data.Value" }}
    options {{ map_entry: true }}
  }}
"""
RECORD_PROTO = f"""
name: "tests/aialgs_record.proto"
package: "aialgs.data"
syntax: "proto2"
message_type {{ name: "Float32Tensor" {_TENSOR_FIELDS.format(value_type="TYPE_FLOAT")} }}
message_type {{ name: "Float64Tensor" {_TENSOR_FIELDS.format(value_type="TYPE_DOUBLE")} }}
message_type {{ name: "Int32Tensor" {_TENSOR_FIELDS.format(value_type="TYPE_INT32")} }}
message_type {{
  name: "Bytes"
  field {{ name: "value" number: 1 label: LABEL_REPEATED type: TYPE_BYTES }}
  field {{ name: "content_type" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }}
}}
message_type {{
  name: "Value"
  field {{ name: "float32_tensor" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".aialgs.data.Float32Tensor" oneof_index: 0 }}
  field {{ name: "float64_tensor" number: 3 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".aialgs.data.Float64Tensor" oneof_index: 0 }}
  field {{ name: "int32_tensor" number: 7 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".aialgs.data.Int32Tensor" oneof_index: 0 }}
  field {{ name: "bytes" number: 9 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".aialgs.data.Bytes" oneof_index: 0 }}
  oneof_decl {{ name: "value" }}
}}
message_type {{
  name: "Record"
  field {{ name: "features" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".aialgs.data.Record.FeaturesEntry" }}
  field {{ name: "label" number: 2 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".aialgs.data.Record.LabelEntry" }}
  field {{ name: "uid" number: 3 label: LABEL_OPTIONAL type: TYPE_STRING }}
  field {{ name: "metadata" number: 4 label: LABEL_OPTIONAL type: TYPE_STRING }}
  field {{ name: "configuration" number: 5 label: LABEL_OPTIONAL type: TYPE_STRING }}
  {_MAP_ENTRY.format(name="FeaturesEntry")}
  {_MAP_ENTRY.format(name="LabelEntry")}
}}
"""


def _record_class() -> Any:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(text_format.Parse(RECORD_PROTO, descriptor_pb2.FileDescriptorProto()))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("aialgs.data.Record"))


Record = _record_class()
MAGIC = 0xCED7230A
TENSOR = {
    np.dtype(np.float32): "float32_tensor",
    np.dtype(np.float64): "float64_tensor",
    np.dtype(np.int32): "int32_tensor",
}


def framed(payload: bytes, flag: int = 0) -> bytes:
    """One RecordIO record: magic, (flag << 29 | length), payload, zero padding to 4 bytes."""
    return struct.pack("<II", MAGIC, flag << 29 | len(payload)) + payload + b"\0" * (-len(payload) % 4)


def framed_split(payload: bytes) -> bytes:
    """As MXNet/dmlc's writer: split the payload at every 4-aligned magic (dropped), parts flagged 1, 2, 3."""
    magic = struct.pack("<I", MAGIC)
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i : i + 4] == magic]
    if not cuts:
        return framed(payload)
    out, start = b"", 0
    for number, cut in enumerate(cuts):
        out += framed(payload[start:cut], 1 if number == 0 else 2)
        start = cut + 4
    return out + framed(payload[start:], 3)


def dense_record(row: np.ndarray) -> bytes:
    record = Record()
    getattr(record.features["values"], TENSOR[row.dtype]).values.extend(row.tolist())
    return bytes(record.SerializeToString())


def sparse_record(keys: list[int], values: np.ndarray, width: int) -> bytes:
    """As the SDK's write_spmatrix_to_sparse_tensor writes a row: values, keys, shape [width]."""
    record = Record()
    tensor = getattr(record.features["values"], TENSOR[values.dtype])
    tensor.values.extend(values.tolist())
    tensor.keys.extend(keys)
    tensor.shape.append(width)
    return bytes(record.SerializeToString())


def dense_body(matrix: np.ndarray) -> bytes:
    """As the SDK's write_numpy_to_dense_tensor: one record per row."""
    return b"".join(framed(dense_record(row)) for row in matrix)


def sparse_body(matrix: np.ndarray, order: np.random.Generator | None = None) -> bytes:
    out = []
    for row in matrix:
        keys = np.flatnonzero(row)
        if order is not None:
            keys = order.permutation(keys)
        out.append(framed(sparse_record(keys.tolist(), row[keys], matrix.shape[1])))
    return b"".join(out)


def read_response(body: bytes) -> list[Any]:
    """Whole records (flag 0) only: what the SDK's reader handles."""
    records, offset = [], 0
    while offset < len(body):
        magic, word = struct.unpack_from("<II", body, offset)
        assert magic == MAGIC and word >> 29 == 0, (offset, hex(magic), word)
        records.append(Record.FromString(body[offset + 8 : offset + 8 + word]))
        offset += 8 + word + (-word % 4)
    assert offset == len(body)
    return records


def predictions_of(records: list[Any]) -> list[tuple[float, float]]:
    out = []
    for record in records:
        assert len(record.features) == 0 and set(record.label) == {"closest_cluster", "distance_to_cluster"}
        pair = []
        for name in ("closest_cluster", "distance_to_cluster"):
            value = record.label[name]
            assert value.WhichOneof("value") == "float32_tensor", value
            assert len(value.float32_tensor.values) == 1 and not value.float32_tensor.keys
            pair.append(value.float32_tensor.values[0])
        out.append((pair[0], pair[1]))
    return out


# --- a deployed endpoint, shared by the API tests of this module ------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("formats")
    settings_ = Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp / 'centroid.db'}",
        log_format="text",
        log_level="WARNING",
        embedded_worker=False,
    )
    with TestClient(create_app(settings_)) as client:
        blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
        model = trained_model(client, blobs["id"])
        deployed(client, model["id"])
        yield client, model


@pytest.fixture
def client(served: tuple[TestClient, dict[str, Any]]) -> TestClient:
    return served[0]


ROWS = np.array([[0.1, 0.1], [10.0, 0.0], [0.0, 10.2], [0.3, 0.2], [10.4, 0.1]])


def csv_answer(client: TestClient, rows: np.ndarray) -> list[dict[str, float]]:
    body = "".join(",".join(repr(float(v)) for v in row) + "\n" for row in rows)
    response = client.post(INVOKE, content=body, headers={"content-type": "text/csv"})
    assert response.status_code == 200, response.text
    return response.json()["predictions"]  # type: ignore[no-any-return]


def invoke(client: TestClient, body: bytes | str, content_type: str, accept: str | None = None) -> Any:
    headers = {"content-type": content_type} | ({"accept": accept} if accept else {})
    return client.post(INVOKE, content=body, headers=headers)


# --- 1. JSON: sparse and vector instances -----------------------------------------------------------------


def test_sparse_json_instances_answer_as_the_equivalent_dense_rows(client: TestClient) -> None:
    instances = [
        {"data": {"features": {"keys": [1, 0], "shape": [2], "values": [0.1, 0.1]}}},
        {"data": {"features": {"keys": [0], "shape": [2], "values": [10.0]}}},  # y missing: 0
        {"data": {"features": {"keys": [1], "shape": [2], "values": [10.2]}}},
        {"data": {"features": {"keys": [1, 0], "shape": [2], "values": [0.2, 0.3]}}},  # order does not matter
        {"data": {"features": {"keys": [0, 1], "shape": [2], "values": [10.4, 0.1]}}},
    ]
    expected = csv_answer(client, ROWS)
    response = invoke(client, json.dumps({"instances": instances}), "application/json")
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == expected
    lines = "".join(json.dumps(instance) + "\n" for instance in instances)
    response = invoke(client, lines, "application/jsonlines")
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == expected


def test_a_sparse_instance_is_not_read_as_its_values(client: TestClient) -> None:
    """Issue 13's wrong answer: keys [1, 0] over values [10, 0] is the row (0, 10), not (10, 0)."""
    sparse = {"instances": [{"data": {"features": {"keys": [1, 0], "shape": [2], "values": [10.0, 0.0]}}}]}
    answer = invoke(client, json.dumps(sparse), "application/json").json()["predictions"]
    assert answer == csv_answer(client, np.array([[0.0, 10.0]]))
    assert answer != csv_answer(client, np.array([[10.0, 0.0]]))


@pytest.mark.parametrize("kind", ["application/json", "application/jsonlines"])
def test_the_parsers_fast_and_exact_read_sparse_rows_alike(kind: str) -> None:
    instances: list[Any] = [
        {"data": {"features": {"keys": [2, 0, 1], "shape": [3], "values": [1, 2, 3]}}},
        {"data": {"features": {"keys": [], "shape": [3], "values": []}}},
        {"data": {"features": [4, 5, 6]}},
        {"data": {"features": {"values": [7, 8, 9]}}},
        {"data": {"features": {"values": [7, 8, 9], "shape": [3]}}},
        {"features": [1.5, 0, -1]},
        [0, 0, 1],
    ]
    expected = [[2, 3, 1], [0, 0, 0], [4, 5, 6], [7, 8, 9], [7, 8, 9], [1.5, 0, -1], [0, 0, 1]]

    def body(items: list[Any]) -> bytes:
        if kind == "application/json":
            return json.dumps({"instances": items}).encode()
        return "".join(json.dumps(item) + "\n" for item in items).encode()

    assert parse_features(body(instances), kind, 3, 100).tolist() == expected
    # a string value sends the body to the exact path, which reads the other rows the same way
    with_text = [*instances, {"data": {"features": {"keys": [0], "shape": [3], "values": ["2.5"]}}}]
    assert parse_features(body(with_text), kind, 3, 100).tolist() == [*expected, [2.5, 0, 0]]


def test_vector_form_is_accepted(client: TestClient) -> None:
    body = {"instances": [{"data": {"features": row}} for row in ROWS.tolist()]}
    response = invoke(client, json.dumps(body), "application/json")
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == csv_answer(client, ROWS)


def _sparse(keys: Any, values: Any, shape: Any = (2,)) -> dict[str, Any]:
    element: dict[str, Any] = {"values": values}
    if keys is not None:
        element["keys"] = keys
    if shape is not None:
        element["shape"] = list(shape)
    return {"data": {"features": element}}


@pytest.mark.parametrize(
    ("instance", "fragment"),
    [
        (_sparse([0, 2], [1, 1]), "key 2 is out of range for shape [2]"),
        (_sparse([0, -1], [1, 1]), "key -1 is out of range"),
        (_sparse([0, 2**70], [1, 1]), "out of range"),
        (_sparse([1, 1], [1, 1]), "key 1 appears more than once"),
        (_sparse([0, 1], [1]), "2 keys but 1 values"),
        (_sparse([0], [1, 2]), "1 keys but 2 values"),
        (_sparse([0], [1], shape=(3,)), "shape [3] does not match the model's 2 features"),
        (_sparse([0], [1], shape=(1, 2)), "shape [1, 2] does not match"),
        (_sparse([0], [1], shape=None), "needs a shape"),
        (_sparse([0.0], [1]), "key 0.0 is not an integer"),
        (_sparse(["0"], [1]), "is not an integer"),
        (_sparse([0], [True]), "not a number"),
        (_sparse([0], ["x"]), "'x' is not a number"),
        (_sparse(None, [1, 2], shape=(5,)), "shape [5] does not match"),
        (_sparse(None, [1, 2, 3], shape=None), "has 3 features; the model expects 2"),
        ({"data": {"features": {"keys": [0], "shape": [2]}}}, 'no "values"'),
        ({"data": {"features": {"keys": 0, "shape": [2], "values": [1]}}}, "keys must be a list"),
        ({"data": {"features": "1,2"}}, "expected"),
        ({"data": [1, 2]}, "expected"),
    ],
)
def test_malformed_sparse_rows_are_400_naming_the_instance(client: TestClient, instance: Any, fragment: str) -> None:
    instances = [{"features": [0.1, 0.1]}, instance]
    for kind, body in (
        ("application/json", json.dumps({"instances": instances})),
        ("application/jsonlines", "".join(json.dumps(item) + "\n" for item in instances)),
    ):
        error = assert_error(invoke(client, body, kind), 400, "invalid_input", fragment)
        where = "instance 1" if "number" not in fragment and "features;" not in fragment else "row 1"
        assert where in error["message"], (kind, error)


def test_many_sparse_rows_are_not_counted_as_three_rows_each(tmp_path: Path) -> None:
    """The cheap row-count bound before parsing does not count a sparse row's keys and shape arrays."""
    instances = [{"data": {"features": {"keys": [0], "shape": [2], "values": [1.0]}}}] * 5
    body = json.dumps({"instances": instances}).encode()
    assert parse_features(body, "application/json", 2, 5).tolist() == [[1.0, 0.0]] * 5
    with pytest.raises(Exception, match="at most 4"):
        parse_features(body, "application/json", 2, 4)


# --- 2. RecordIO-protobuf ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_body",
    [
        pytest.param(lambda m: dense_body(m.astype(np.float32)), id="dense-float32"),
        pytest.param(lambda m: dense_body(m), id="dense-float64"),
        pytest.param(lambda m: sparse_body(m.astype(np.float32), np.random.default_rng(3)), id="sparse-float32"),
        pytest.param(lambda m: sparse_body(m), id="sparse-float64"),
        pytest.param(
            lambda m: dense_body(m[:2]) + sparse_body(m[2:3].astype(np.float32)) + dense_body(m[3:].astype(np.float32)),
            id="mixed",
        ),
    ],
)
def test_recordio_requests_answer_as_csv_does(client: TestClient, make_body: Any) -> None:
    expected = csv_answer(client, ROWS.astype(np.float32).astype(np.float64))
    body = make_body(ROWS)
    response = invoke(client, body, RECORDIO)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    got = response.json()["predictions"]
    assert [p["closest_cluster"] for p in got] == [p["closest_cluster"] for p in expected]
    np.testing.assert_allclose(
        [p["distance_to_cluster"] for p in got], [p["distance_to_cluster"] for p in expected], rtol=1e-6, atol=1e-6
    )


def test_int32_tensors_are_read(client: TestClient) -> None:
    rows = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.int32)
    response = invoke(client, dense_body(rows), RECORDIO)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == csv_answer(client, rows.astype(np.float64))


def test_recordio_responses_are_one_record_per_row(client: TestClient) -> None:
    expected = csv_answer(client, ROWS.astype(np.float32).astype(np.float64))
    response = invoke(client, dense_body(ROWS.astype(np.float32)), RECORDIO, accept=RECORDIO)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == RECORDIO
    got = predictions_of(read_response(response.content))
    assert [c for c, _ in got] == [p["closest_cluster"] for p in expected]
    assert [d for _, d in got] == [float(np.float32(p["distance_to_cluster"])) for p in expected]
    # JSON in, RecordIO out: the same answers
    as_json = invoke(client, json.dumps({"instances": ROWS.astype(np.float32).tolist()}), "application/json", RECORDIO)
    assert as_json.content == response.content


def test_large_recordio_bodies_take_the_route_and_agree(client: TestClient) -> None:
    rng = np.random.default_rng(7)
    rows = np.concatenate([rng.normal(center, 0.3, (700, 2)) for center in ([0, 0], [10, 0], [0, 10])])
    body = dense_body(rows.astype(np.float32))
    assert len(body) > 16 * 1024  # larger than the fast lane answers inline
    response = invoke(client, body, RECORDIO, accept=RECORDIO)
    assert response.status_code == 200, response.text
    got = predictions_of(read_response(response.content))
    expected = csv_answer(client, rows.astype(np.float32).astype(np.float64))
    assert [c for c, _ in got] == [p["closest_cluster"] for p in expected]
    sparse = invoke(client, sparse_body(rows.astype(np.float32)), RECORDIO, accept=RECORDIO)
    assert sparse.content == response.content


def test_the_lane_and_the_route_answer_recordio_alike(
    served: tuple[TestClient, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = served[0]
    bodies = [dense_body(ROWS.astype(np.float32)), sparse_body(ROWS.astype(np.float32)), b"\x0a\x23\xd7\xce\x04"]
    lane = [invoke(client, body, RECORDIO, accept=RECORDIO) for body in bodies]

    async def straight_through(self: FastLane, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    monkeypatch.setattr(FastLane, "__call__", straight_through)
    route = [invoke(client, body, RECORDIO, accept=RECORDIO) for body in bodies]
    assert [r.status_code for r in lane] == [r.status_code for r in route] == [200, 200, 400]
    assert [r.headers["content-type"] for r in lane] == [r.headers["content-type"] for r in route]
    assert lane[0].content == route[0].content == lane[1].content
    assert lane[2].json()["error"]["message"] == route[2].json()["error"]["message"]


def test_a_record_split_around_the_magic_is_joined() -> None:
    """A payload with the magic at a 4-aligned offset, split as MXNet's writer splits it."""
    magic_float = np.frombuffer(struct.pack("<I", MAGIC), dtype="<f4")[0]
    row = np.array([magic_float, 1.0, 2.0, magic_float], dtype=np.float32)
    payload = dense_record(row)
    body = framed_split(payload) + dense_body(np.array([[3.0, 4.0, 5.0, 6.0]], dtype=np.float32))
    flags = [word >> 29 for word in _headers(body)]
    assert flags[0] == 1 and 3 in flags and flags[-1] == 0, flags
    matrix = recordio.read_features(body, 4, 10)
    assert matrix.tolist() == [row.astype(np.float64).tolist(), [3.0, 4.0, 5.0, 6.0]]


def test_records_of_other_lengths_are_not_counted_by_the_first_ones_length() -> None:
    """A body whose length happens to be a multiple of its first record's: still its true record count."""
    rng = np.random.default_rng(11)
    for _ in range(500):
        matrix = rng.integers(0, 2, (2, 6)).astype(np.float32) * rng.normal(size=(2, 6)).astype(np.float32)
        body = sparse_body(matrix)
        first = 8 + _headers(body)[0]
        first += -first % 4
        if len(body) % first == 0 and len(body) // first > 2:
            break
    else:
        pytest.fail("no such body found")
    assert np.array_equal(recordio.read_features(body, 6, 2), matrix.astype(np.float64))


def _headers(body: bytes) -> list[int]:
    words, offset = [], 0
    while offset < len(body):
        _, word = struct.unpack_from("<II", body, offset)
        words.append(word)
        length = word & ((1 << 29) - 1)
        offset += 8 + length + (-length % 4)
    return words


def _with_word(body: bytes, word: int) -> bytes:
    return body[:4] + struct.pack("<I", word) + body[8:]


GOOD = dense_record(np.array([0.1, 0.2], dtype=np.float32))


def _record(build: Any) -> bytes:
    record = Record()
    build(record)
    return framed(bytes(record.SerializeToString()))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\x00" * 3, "truncated header"),
        (framed(GOOD) + b"\x0a\x23\xd7", "record 1 at byte"),
        (b"\x0b\x23\xd7\xce" + framed(GOOD)[4:], "bad magic 0xced7230b"),
        (framed(GOOD) + b"JUNKJUNK", "bad magic"),
        (framed(GOOD)[:-3], "truncated"),
        (framed(GOOD + b"\0")[:-3], "padding"),
        (_with_word(framed(GOOD), 4 << 29 | len(GOOD)), "invalid continuation flag 4"),
        (_with_word(framed(GOOD), 2 << 29 | len(GOOD)), "no first part"),
        (_with_word(framed(GOOD), 3 << 29 | len(GOOD)), "no first part"),
        (framed(GOOD[:8], 1), "ends inside a multi-part record"),
        (framed(GOOD[:8], 1) + framed(GOOD), "whole record (flag 0) inside a multi-part"),
        (framed(GOOD[:8], 1) + framed(GOOD[:8], 1), "a new multi-part record"),
        (framed(b"\xff\xff\xff"), "record 0: not a valid aialgs.data.Record"),
        (framed(GOOD) + framed(b"\x0a\x05"), "record 1: not a valid"),
        (framed(b""), 'no features["values"]'),
        (_record(lambda r: r.features["x"].float32_tensor.values.extend([1, 2])), "features: 'x'"),
        (_record(lambda r: r.features["values"].bytes.value.append(b"1,2")), "holds a bytes value"),
        (_record(lambda r: r.features["values"].SetInParent()), "holds nothing"),
        (dense_body(np.array([[1, 2, 3]], dtype=np.float32)), "record 0 has 3 features; the model expects 2"),
        (
            dense_body(np.ones((2, 2), dtype=np.float32)) + dense_body(np.ones((1, 3), dtype=np.float32)),
            "record 2 has 3 features",
        ),
        (dense_body(np.array([[1, 2], [1, np.nan]], dtype=np.float32)), "record 1 feature 1: nan is not a finite"),
        (dense_body(np.array([[1, 2], [np.inf, 2]])), "record 1 feature 0: inf"),
        (framed(sparse_record([0, 2], np.array([1, 1], dtype=np.float32), 2)), "key 2 is out of range"),
        (framed(sparse_record([1, 1], np.array([1, 1], dtype=np.float32), 2)), "key 1 appears more than once"),
        (framed(sparse_record([0, 1], np.array([1], dtype=np.float32), 2)), "2 keys but 1 values"),
        (framed(sparse_record([0], np.array([1], dtype=np.float32), 3)), "shape [3] does not match"),
        (
            _record(lambda r: r.features["values"].float32_tensor.keys.append(0)),
            "needs a shape",
        ),
    ],
)
def test_corrupt_recordio_is_400(client: TestClient, body: bytes, fragment: str) -> None:
    error = assert_error(invoke(client, body, RECORDIO), 400, "invalid_input", fragment)
    assert "record" in error["message"] or "empty" in error["message"]


def test_an_empty_recordio_body_is_400(client: TestClient) -> None:
    assert_error(invoke(client, b"", RECORDIO), 400, "invalid_input", "empty")


def test_recordio_is_listed_where_formats_are(client: TestClient) -> None:
    refused = assert_error(invoke(client, "1,2", "text/csv", accept="image/png"), 406, "not_acceptable")
    assert RECORDIO in refused["message"]
    unsupported = assert_error(invoke(client, "1,2", "application/xml"), 415, "unsupported_media_type")
    assert RECORDIO in unsupported["message"]
    operation = client.get("/openapi.json").json()["paths"]["/endpoints/{name}/invocations"]["post"]
    assert RECORDIO in operation["requestBody"]["content"]
    assert RECORDIO in operation["responses"]["200"]["content"]
    assert "application/x-recordio-protobuf" in operation["description"]


def test_recordio_row_limit_is_413(tmp_path: Path) -> None:
    limited = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        max_invocation_rows=3,
        embedded_worker=False,
        log_level="WARNING",
    )
    with TestClient(create_app(limited)) as client:
        blobs = upload_csv(client, "blobs", BLOBS_CSV, "id")
        model = trained_model(client, blobs["id"])
        deployed(client, model["id"])
        ok = invoke(client, dense_body(ROWS[:3].astype(np.float32)), RECORDIO)
        assert ok.status_code == 200, ok.text
        uniform = assert_error(
            invoke(client, dense_body(ROWS[:4].astype(np.float32)), RECORDIO), 413, "payload_too_large"
        )
        assert "4 records" in uniform["message"] and "at most 3" in uniform["message"]
        mixed = dense_body(ROWS[:2]) + sparse_body(ROWS[2:])
        assert_error(invoke(client, mixed, RECORDIO), 413, "payload_too_large", "at most 3")


# --- the decoder on generated data -----------------------------------------------------------------------

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _matrices(dtype: Any) -> Any:
    elements = (
        st.floats(allow_nan=False, allow_infinity=False, width=32)
        if dtype == np.float32
        else st.floats(allow_nan=False, allow_infinity=False)
    )
    sparse_elements = st.one_of(st.just(0.0), elements)
    shapes = hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12)
    return st.one_of(
        hnp.arrays(dtype, shapes, elements=elements),
        hnp.arrays(dtype, shapes, elements=sparse_elements),
    )


@FAST
@given(matrix=st.one_of(_matrices(np.float32), _matrices(np.float64)), sparse=st.booleans(), seed=st.integers(0, 99))
def test_decoding_what_was_encoded_gives_the_matrix(matrix: np.ndarray, sparse: bool, seed: int) -> None:
    body = sparse_body(matrix, np.random.default_rng(seed)) if sparse else dense_body(matrix)
    decoded = recordio.read_features(body, matrix.shape[1], len(matrix))
    assert decoded.dtype == np.float64 and decoded.shape == matrix.shape
    assert np.array_equal(decoded, matrix.astype(np.float64))
    if not sparse:  # the SDK's dense bodies are decoded without a Python step per record
        assert recordio._read_uniform(body, matrix.shape[1], len(matrix)) is not None
    # the same rows written as MXNet would (split around any aligned magic) decode the same
    split = b"".join(framed_split(dense_record(row)) for row in matrix)
    assert np.array_equal(recordio.read_features(split, matrix.shape[1], len(matrix)), decoded)


@FAST
@given(
    clusters=hnp.arrays(np.int64, st.integers(1, 40), elements=st.integers(0, 9999)),
    data=st.data(),
)
def test_responses_decode_to_the_predictions(clusters: np.ndarray, data: st.DataObject) -> None:
    distances = data.draw(
        hnp.arrays(np.float64, len(clusters), elements=st.floats(0, 1e30, allow_nan=False)), label="distances"
    )
    got = predictions_of(read_response(recordio.write_predictions(clusters, distances)))
    assert [c for c, _ in got] == clusters.astype(np.float32).tolist()
    assert [d for _, d in got] == distances.astype(np.float32).tolist()


def _only_invalid_input(body: bytes, width: int) -> np.ndarray | None:
    """The decoded rows, or None for a 400; anything else raised fails the test."""
    try:
        matrix = recordio.read_features(body, width, 10_000)
    except InvalidInput:
        return None
    assert matrix.shape[1] == width and np.isfinite(matrix).all()
    return matrix


def _record_by_record(body: bytes, width: int) -> np.ndarray | None:
    """The same decoding without the uniform-body shortcut."""
    with mock.patch.object(recordio, "_read_uniform", lambda *_: None):
        return _only_invalid_input(body, width)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), width=st.integers(1, 4))
def test_random_bytes_are_400_or_rows(body: bytes, width: int) -> None:
    _only_invalid_input(body, width)
    _only_invalid_input(struct.pack("<I", MAGIC) + body, width)
    _only_invalid_input(struct.pack("<II", MAGIC, len(body)) + body + b"\0" * (-len(body) % 4), width)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(data=st.data(), matrix=_matrices(np.float32), sparse=st.booleans())
def test_damaged_bodies_are_400_or_rows(data: st.DataObject, matrix: np.ndarray, sparse: bool) -> None:
    body = bytearray(sparse_body(matrix) if sparse else dense_body(matrix))
    for _ in range(data.draw(st.integers(1, 4), label="damages")):
        at = data.draw(st.integers(0, len(body) - 1), label="at")
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]), label="action")
        if action == "flip":
            body[at] ^= data.draw(st.integers(1, 255), label="bits")
        elif action == "cut":
            del body[at:]
            if not body:
                body = bytearray(b"\0")
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=9), label="inserted")
    decoded = _only_invalid_input(bytes(body), matrix.shape[1])
    # the uniform-body shortcut accepts exactly what the record-by-record reading accepts, alike
    general = _record_by_record(bytes(body), matrix.shape[1])
    assert (decoded is None) == (general is None)
    assert decoded is None or np.array_equal(decoded, general)  # type: ignore[arg-type]
