"""``application/x-recordio-protobuf``: SageMaker's RecordIO-wrapped ``Record`` protobuf.

The format the SageMaker SDK's ``KMeansPredictor`` sends and expects by default.

**Framing** (MXNet/dmlc RecordIO): every record is ``u32 magic 0xced7230a``, a ``u32`` word whose
upper 3 bits are the continuation flag and lower 29 bits the payload length (both little-endian),
the payload, then zero padding to a multiple of 4 bytes. Flag 0 is a whole record; a writer that
finds the magic inside a payload splits it there into parts flagged 1 (first), 2 (middle) and
3 (last), and the reader joins the parts with the magic between them. Both are read here; records
written here are always whole (flag 0), as the SDK writes them (its reader ignores the flag).

**Payload**: ``aialgs.data.Record`` (the SDK's ``record.proto``): ``features`` and ``label`` are
maps from a name to a ``Value``, a oneof of ``Float32Tensor`` / ``Float64Tensor`` / ``Int32Tensor``
(each ``values``, ``keys``, ``shape``; packed) or ``Bytes``. A request row is ``features["values"]``:
dense (no ``keys``: ``values`` holds every feature) or sparse (``keys`` index into ``shape[0]``,
missing entries are 0). A response is one ``Record`` per row with ``label["closest_cluster"]`` and
``label["distance_to_cluster"]``, each a one-value float32 tensor, as SageMaker KMeans answers.

The message classes are built at import from that documented schema with the ``protobuf`` package
(a ``FileDescriptorProto`` in its own descriptor pool). Decoding and encoding avoid Python work per
row where the bytes allow it:

* **Requests, uniform body** (what the SDK's ``write_numpy_to_dense_tensor`` writes: every record
  the same dense tensor type and width): the first record is parsed with protobuf and serialized
  again; when that canonical form is byte for byte the record, its packed ``values`` are its last
  bytes and everything before them is a fixed prefix. Every other record of the same length with
  the same header and prefix parses, by protobuf's own rules, to the same message with other values,
  so the whole body is checked and decoded with numpy: one byte comparison over all records, then
  ``frombuffer`` of the value columns.
* **Requests, anything else** (sparse rows, int32 tensors, mixed types, multi-part records,
  unpacked encodings): the framing is walked record by record and each payload is parsed with
  protobuf; its tensor becomes a numpy row.
* **Responses**: one template record is serialized with protobuf, the offsets of its two float32
  values located, and the body is that template repeated per row with the values written in by
  numpy.

Every malformed body (bad magic, a length past the end, a broken continuation, a payload protobuf
cannot parse, a tensor that does not fit the model) is :class:`~service.errors.InvalidInput` (400)
naming the record and what is wrong; more records than allowed is
:class:`~service.errors.PayloadTooLarge` (413), found from the framing before the rows are decoded.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from service.errors import InvalidInput, PayloadTooLarge

RECORDIO = "application/x-recordio-protobuf"
MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3
# tensors whose packed values are raw little-endian IEEE floats (int32 values are varints)
_DENSE_TYPES: dict[str, np.dtype[Any]] = {"float32_tensor": np.dtype("<f4"), "float64_tensor": np.dtype("<f8")}
_TENSORS = ("float32_tensor", "float64_tensor", "int32_tensor")


# --- the schema: aialgs.data (record.proto), built with the protobuf package -------------------------------


def _record_class() -> Any:
    """The ``aialgs.data.Record`` message class, from a FileDescriptorProto of record.proto."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="centroid/aialgs_record.proto", package="aialgs.data", syntax="proto2"
    )
    F = descriptor_pb2.FieldDescriptorProto
    optional, repeated = F.LABEL_OPTIONAL, F.LABEL_REPEATED

    def field(message: Any, name: str, number: int, kind: int, label: int = optional, **extra: Any) -> Any:
        added = message.field.add(name=name, number=number, type=kind, label=label, **extra)
        if label == repeated and kind not in (F.TYPE_MESSAGE, F.TYPE_STRING, F.TYPE_BYTES):
            added.options.packed = True
        return added

    for name, value_type in (
        ("Float32Tensor", F.TYPE_FLOAT),
        ("Float64Tensor", F.TYPE_DOUBLE),
        ("Int32Tensor", F.TYPE_INT32),
    ):
        tensor = fdp.message_type.add(name=name)
        field(tensor, "values", 1, value_type, repeated)
        field(tensor, "keys", 2, F.TYPE_UINT64, repeated)
        field(tensor, "shape", 3, F.TYPE_UINT64, repeated)

    raw = fdp.message_type.add(name="Bytes")
    field(raw, "value", 1, F.TYPE_BYTES, repeated)
    field(raw, "content_type", 2, F.TYPE_STRING)

    value = fdp.message_type.add(name="Value")
    value.oneof_decl.add(name="value")
    for name, number, type_name in (
        ("float32_tensor", 2, "Float32Tensor"),
        ("float64_tensor", 3, "Float64Tensor"),
        ("int32_tensor", 7, "Int32Tensor"),
        ("bytes", 9, "Bytes"),
    ):
        field(value, name, number, F.TYPE_MESSAGE, type_name=f".aialgs.data.{type_name}", oneof_index=0)

    record = fdp.message_type.add(name="Record")
    for name, number in (("features", 1), ("label", 2)):
        entry = record.nested_type.add(name=f"{name.capitalize()}Entry")
        entry.options.map_entry = True
        field(entry, "key", 1, F.TYPE_STRING)
        field(entry, "value", 2, F.TYPE_MESSAGE, type_name=".aialgs.data.Value")
        field(record, name, number, F.TYPE_MESSAGE, repeated, type_name=f".aialgs.data.Record.{entry.name}")
    for name, number in (("uid", 3), ("metadata", 4), ("configuration", 5)):
        field(record, name, number, F.TYPE_STRING)

    pool = descriptor_pool.DescriptorPool()  # its own pool: no clash with the SDK's record_pb2 if loaded
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("aialgs.data.Record"))


Record: Any = _record_class()  # a generated message class: its fields are not known to type checkers


# --- framing ----------------------------------------------------------------------------------------------


def _padded(length: int) -> int:
    return (length + 3) & ~3


def frame(payload: bytes) -> bytes:
    """One whole RecordIO record (flag 0) around ``payload``."""
    if len(payload) > _LENGTH_MASK:
        raise ValueError("a RecordIO record holds at most 2**29 - 1 bytes")
    return _MAGIC_BYTES + struct.pack("<I", len(payload)) + payload + b"\0" * (_padded(len(payload)) - len(payload))


def split_records(body: bytes, max_records: int) -> list[bytes]:
    """The payloads of ``body``'s records, multi-part records joined; 400 on any framing error."""
    payloads: list[bytes] = []
    parts: list[bytes] = []  # the parts of a multi-part record read so far
    offset, size = 0, len(body)
    unpack = struct.unpack_from
    while offset < size:
        index, at = len(payloads), offset
        if size - offset < 8:
            raise _framing(index, offset, f"truncated header: {size - offset} byte(s) left, a header is 8")
        magic, word = unpack("<II", body, offset)
        if magic != MAGIC:
            raise _framing(index, offset, f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})")
        flag, length = word >> _LENGTH_BITS, word & _LENGTH_MASK
        start = offset + 8
        end = start + _padded(length)
        if end > size:
            problem = (
                f"truncated: the header announces {length} byte(s), {size - start} remain in the body"
                if start + length > size
                else f"truncated: the {length}-byte payload's zero padding to a multiple of 4 bytes is missing"
            )
            raise _framing(index, offset, problem)
        chunk = body[start : start + length]
        offset = end
        if flag == _WHOLE:
            if parts:
                raise _framing(index, at, "a whole record (flag 0) inside a multi-part record")
            payloads.append(chunk)
        elif flag == _FIRST:
            if parts:
                raise _framing(index, at, "a new multi-part record (flag 1) before the last one ended (flag 3)")
            parts.append(chunk)
        elif flag in (_MIDDLE, _LAST):
            if not parts:
                raise _framing(index, at, f"a continuation part (flag {flag}) with no first part (flag 1)")
            parts.append(chunk)
            if flag == _LAST:
                payloads.append(_MAGIC_BYTES.join(parts))
                parts = []
        else:
            raise _framing(index, at, f"invalid continuation flag {flag} (0 to 3)")
        if len(payloads) > max_records:
            raise _too_many(len(payloads), max_records, exact=False)
    if parts:
        raise _framing(len(payloads), size, "the body ends inside a multi-part record (no part with flag 3)")
    return payloads


def _framing(index: int, offset: int, problem: str) -> InvalidInput:
    return InvalidInput(
        f"RecordIO record {index} at byte {offset}: {problem}", details={"record": index, "offset": offset}
    )


def _too_many(records: int, max_records: int, *, exact: bool) -> PayloadTooLarge:
    count = f"{records}" if exact else f"more than {max_records}"
    return PayloadTooLarge(
        f"the request holds {count} records; at most {max_records} rows are accepted per request (send batches)",
        details={"rows": records, "limit": max_records},
    )


# --- requests ---------------------------------------------------------------------------------------------


def read_features(body: bytes, feature_dim: int, max_rows: int) -> np.ndarray:
    """The request's feature matrix, shape (records, feature_dim), finite float64."""
    if not body:
        raise InvalidInput("the request body is empty")
    matrix = _read_uniform(body, feature_dim, max_rows)
    if matrix is None:
        matrix = _read_records(split_records(body, max_rows), feature_dim)
    _check_finite(matrix)
    return matrix


def _read_uniform(body: bytes, feature_dim: int, max_rows: int) -> np.ndarray | None:
    """Every record a whole dense float32/float64 record like the first: decoded with numpy.

    None when the body is anything else (the record-by-record path then reads it, or says what is
    wrong). Checked: the first record's bytes are its canonical protobuf serialization, with the
    packed values last; every record has the same 8-byte header and the same bytes before its values.
    """
    if len(body) < 8:
        return None
    magic, word = struct.unpack_from("<II", body)
    length = word  # flag 0 (whole record) or the word is not a plain length
    if magic != MAGIC or length > _LENGTH_MASK or length == 0:
        return None
    stride = 8 + _padded(length)
    if len(body) % stride:
        return None
    records = len(body) // stride
    first = body[8 : 8 + length]
    template = _canonical_dense(first)
    if template is None:
        return None
    dtype, width = template
    if width != feature_dim:
        return None  # the record-by-record path names the record and the width
    prefix = 8 + length - width * dtype.itemsize  # header + payload bytes before the packed values
    table = np.frombuffer(body, dtype=np.uint8).reshape(records, stride)
    if records > 1 and not (table[1:, :prefix] == table[0, :prefix]).all():
        return None
    if records > max_rows:
        raise _too_many(records, max_rows, exact=True)
    values = np.ascontiguousarray(table[:, prefix : 8 + length]).view(dtype)
    return values.astype(np.float64)


def _canonical_dense(payload: bytes) -> tuple[np.dtype[Any], int] | None:
    """(value dtype, width) when ``payload`` is exactly a Record holding only a dense float32 or
    float64 ``features["values"]`` with at least one value, serialized canonically (values last)."""
    try:
        record = Record.FromString(payload)
    except (DecodeError, RuntimeError, ValueError):
        return None
    features = record.features
    if len(features) != 1 or "values" not in features:
        return None
    value = features["values"]
    kind = value.WhichOneof("value")
    if kind not in _DENSE_TYPES:
        return None
    tensor = getattr(value, kind)
    if len(tensor.keys) or len(tensor.shape) or not len(tensor.values):
        return None
    canonical = Record()
    getattr(canonical.features["values"], kind).values.extend(tensor.values)
    if canonical.SerializeToString() != payload:
        return None
    return _DENSE_TYPES[kind], len(tensor.values)


def _read_records(payloads: list[bytes], feature_dim: int) -> np.ndarray:
    """Record by record: each payload parsed with protobuf; its values, keys and shape gathered
    into flat lists, and the rows filled (and sparse keys checked) with numpy once at the end."""
    matrix = np.zeros((len(payloads), feature_dim))
    dense_rows: list[int] = []
    dense_values: list[float] = []
    sparse_rows: list[int] = []
    sparse_keys: list[int] = []
    sparse_values: list[float] = []
    wanted = [feature_dim]
    for index, payload in enumerate(payloads):
        tensor = _tensor(payload, index)
        values, keys, shape = tensor.values[:], tensor.keys[:], tensor.shape[:]
        if keys:
            if shape != wanted:
                if not shape:
                    raise InvalidInput(
                        f"record {index}: a sparse tensor (keys) needs a shape; send [{feature_dim}]",
                        details={"record": index},
                    )
                raise _bad_shape(index, shape, feature_dim)
            if len(keys) != len(values):
                raise InvalidInput(
                    f"record {index}: {len(keys)} keys but {len(values)} values", details={"record": index}
                )
            sparse_rows.extend([index] * len(keys))
            sparse_keys.extend(keys)
            sparse_values.extend(values)
        elif shape and shape != wanted:
            raise _bad_shape(index, shape, feature_dim)
        elif len(values) == feature_dim:
            dense_rows.append(index)
            dense_values.extend(values)
        elif values or not shape:  # no values but a shape: a sparse row with nothing stored, all zeros
            raise InvalidInput(
                f"record {index} has {len(values)} features; the model expects {feature_dim}",
                details={"record": index, "features": len(values), "expected": feature_dim},
            )
    if dense_rows:
        matrix[dense_rows] = np.array(dense_values, dtype=np.float64).reshape(len(dense_rows), feature_dim)
    if sparse_keys:
        rows = np.array(sparse_rows, dtype=np.int64)
        keys = np.array(sparse_keys, dtype=np.uint64)
        _check_keys(rows, keys, feature_dim)
        matrix[rows, keys.astype(np.int64)] = np.array(sparse_values, dtype=np.float64)
    return matrix


def _tensor(payload: bytes, index: int) -> Any:
    """The ``features["values"]`` tensor of one record's payload; 400 naming what is wrong."""
    where = {"record": index}
    try:
        features = Record.FromString(payload).features
        if "values" not in features:
            names = list(features)
            shown = ", ".join(repr(name[:40]) for name in names[:5]) or "none"
            raise InvalidInput(f'record {index}: no features["values"] tensor (features: {shown})', details=where)
    except (DecodeError, RuntimeError, ValueError, UnicodeError) as exc:
        raise InvalidInput(f"record {index}: not a valid aialgs.data.Record protobuf ({exc})", details=where) from exc
    value = features["values"]
    kind = value.WhichOneof("value")
    if kind not in _TENSORS:
        found = "nothing" if kind is None else f"a {kind} value"
        raise InvalidInput(
            f'record {index}: features["values"] holds {found}; send a float32, float64 or int32 tensor',
            details=where,
        )
    return getattr(value, kind)


def _check_keys(rows: np.ndarray, keys: np.ndarray, feature_dim: int) -> None:
    """400 for the first key out of range, then for the first key a record holds twice."""
    outside = keys >= feature_dim
    if outside.any():
        at = int(np.argmax(outside))
        record, key = int(rows[at]), int(keys[at])
        raise InvalidInput(
            f"record {record}: key {key} is out of range for shape [{feature_dim}] (keys are 0 to {feature_dim - 1})",
            details={"record": record, "key": key},
        )
    cells = np.sort(rows * feature_dim + keys.astype(np.int64))
    repeated = cells[1:] == cells[:-1]
    if repeated.any():
        record, key = divmod(int(cells[int(np.argmax(repeated))]), feature_dim)
        raise InvalidInput(f"record {record}: key {key} appears more than once", details={"record": record, "key": key})


def _bad_shape(index: int, shape: list[int], feature_dim: int) -> InvalidInput:
    return InvalidInput(
        f"record {index}: shape {shape} does not match the model's {feature_dim} features (send [{feature_dim}])",
        details={"record": index, "shape": shape[:8], "expected": [feature_dim]},
    )


def _check_finite(matrix: np.ndarray) -> None:
    finite = np.isfinite(matrix)
    if finite.all():
        return
    row, column = (int(i) for i in np.argwhere(~finite)[0])
    raise InvalidInput(
        f"record {row} feature {column}: {float(matrix[row, column])!r} is not a finite number",
        details={"record": row, "column": column},
    )


# --- responses --------------------------------------------------------------------------------------------


def _response_template() -> tuple[np.ndarray, int, int]:
    """One framed response Record as bytes, and where its closest_cluster and distance values lie."""
    sentinels = np.frombuffer(b"\x11\x22\x33\x41\x55\x66\x77\x42", dtype="<f4")  # two unusual bit patterns
    record = Record()
    record.label["closest_cluster"].float32_tensor.values.append(float(sentinels[0]))
    record.label["distance_to_cluster"].float32_tensor.values.append(float(sentinels[1]))
    framed = frame(record.SerializeToString())
    offsets = []
    for sentinel in sentinels:
        pattern = sentinel.tobytes()
        if framed.count(pattern) != 1:  # pragma: no cover - a property of the schema, checked by the tests
            raise RuntimeError("the response template's values are not unique in its bytes")
        offsets.append(framed.index(pattern))
    return np.frombuffer(framed, dtype=np.uint8), offsets[0], offsets[1]


_TEMPLATE, _CLUSTER_AT, _DISTANCE_AT = _response_template()


def write_predictions(closest_cluster: np.ndarray, distance_to_cluster: np.ndarray) -> bytes:
    """One framed Record per row: label ``closest_cluster`` and ``distance_to_cluster`` (float32)."""
    rows = len(closest_cluster)
    table = np.empty((rows, len(_TEMPLATE)), dtype=np.uint8)
    table[:] = _TEMPLATE
    table[:, _CLUSTER_AT : _CLUSTER_AT + 4] = np.asarray(closest_cluster, dtype="<f4").view(np.uint8).reshape(rows, 4)
    table[:, _DISTANCE_AT : _DISTANCE_AT + 4] = (
        np.asarray(distance_to_cluster, dtype="<f4").view(np.uint8).reshape(rows, 4)
    )
    return table.tobytes()
