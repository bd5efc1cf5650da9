"""SageMaker KMeans's inference contract: request parsing and response rendering.

Requests: ``text/csv`` (rows of numbers, no header), ``application/json``
(``{"instances": [instance, ...]}``), ``application/jsonlines`` (one instance per line) or
``application/x-recordio-protobuf`` (SageMaker's RecordIO-wrapped ``Record`` protobuf, the SDK's
default: :mod:`service.endpoints.recordio`). A JSON instance is SageMaker's common inference format:
``{"features": [...]}``, a bare ``[...]``, or ``{"data": {"features": element}}`` where the element
is a vector ``[...]`` or the protobuf equivalent ``{"values": [...]}`` (dense) /
``{"keys": [...], "shape": [d], "values": [...]}`` (sparse: ``keys`` index into ``shape[0]``, which
must be the model's feature count; missing entries are 0). Responses, by ``Accept``:
``application/json`` (default) ``{"predictions": [{"closest_cluster": 1.0,
"distance_to_cluster": 3.2}, ...]}``, ``application/jsonlines``, ``text/csv`` or
``application/x-recordio-protobuf`` (one ``Record`` per row, ``closest_cluster`` and
``distance_to_cluster`` in its label map).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv

from service.endpoints import recordio
from service.endpoints.recordio import RECORDIO
from service.engine import Prediction
from service.errors import InvalidInput, NotAcceptable, PayloadTooLarge, UnsupportedMediaType
from service.media_types import media_type

JSON = "application/json"
JSONLINES = "application/jsonlines"
CSV = "text/csv"
REQUEST_TYPES = {
    CSV: CSV,
    JSON: JSON,
    JSONLINES: JSONLINES,
    "application/x-jsonlines": JSONLINES,
    RECORDIO: RECORDIO,
}
RESPONSE_TYPES = (JSON, JSONLINES, CSV, RECORDIO)
_SMALL_CSV_BYTES = 4096  # below this a CSV body is split in Python; above, pyarrow's reader is faster


def request_format(content_type: str | None) -> str:
    kind = REQUEST_TYPES.get(media_type(content_type))
    if kind is None:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {media_type(content_type) or '(none)'!r}; "
            f"send one of {sorted(set(REQUEST_TYPES.values()))}"
        )
    return kind


def response_format(accept: str | None) -> str:
    """The best response type the client accepts (``*/*`` or no header: JSON)."""
    if not accept or not accept.strip():
        return JSON
    ranked: list[tuple[float, int, str]] = []
    for position, part in enumerate(accept.split(",")):
        pieces = [p.strip() for p in part.split(";")]
        quality = 1.0
        for parameter in pieces[1:]:
            if parameter.startswith("q="):
                try:
                    quality = float(parameter[2:])
                except ValueError:
                    quality = 0.0
        ranked.append((-quality, position, pieces[0].lower()))
    for negative_quality, _, kind in sorted(ranked):
        if negative_quality >= 0:
            continue
        if kind in ("*/*", "application/*"):
            return JSON
        if kind == "text/*":
            return CSV
        if kind in RESPONSE_TYPES:
            return kind
        if kind == "application/x-jsonlines":
            return JSONLINES
    raise NotAcceptable(f"cannot respond with {accept!r}; acceptable: {list(RESPONSE_TYPES)}")


def parse_features(body: bytes, kind: str, feature_dim: int, max_rows: int) -> np.ndarray:
    """The request's feature matrix, shape (rows, feature_dim), finite float64.

    Well-formed bodies take a fast path straight to float64 (no DataFrame, no per-cell Python for
    CSV); anything the fast path does not accept is parsed again by the exact path, which either
    reads it the same way or says precisely what is wrong (row, column, value). RecordIO-protobuf
    bodies are binary: :func:`service.endpoints.recordio.read_features` reads them.
    """
    if kind == RECORDIO:
        return recordio.read_features(body, feature_dim, max_rows)
    if not body.strip():
        raise InvalidInput("the request body is empty")
    _refuse_too_many_rows(body, kind, max_rows)
    fast = _fast_csv(body, feature_dim) if kind == CSV else _fast_json(body, kind, feature_dim)
    if fast is not None:
        if len(fast) > max_rows:
            raise _too_many(len(fast), max_rows)
        return fast
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the request body is not UTF-8 (invalid byte at offset {exc.start})") from exc
    if kind == CSV:
        rows = _csv_rows(text)
    elif kind == JSON:
        rows = _json_rows(text, feature_dim)
    else:
        rows = [
            _instance_features(_load_json(line, f"line {i}"), i, feature_dim)
            for i, line in enumerate(text.splitlines())
            if line.strip()
        ]
    if len(rows) > max_rows:
        raise _too_many(len(rows), max_rows)
    return _matrix(rows, feature_dim)


def _fast_csv(body: bytes, feature_dim: int) -> np.ndarray | None:
    """Plain numeric CSV (no quotes, one row per line) to float64; None for anything else."""
    if b'"' in body or b"\r" in body:
        return None
    data = body.strip(b"\n")
    if b"\n\n" in data:
        return None  # blank lines: the exact path skips them
    rows = data.count(b"\n") + 1
    if rows * (feature_dim - 1) != data.count(b","):
        return None
    try:
        if len(data) <= _SMALL_CSV_BYTES:
            if rows > 1 and any(line.count(b",") != feature_dim - 1 for line in data.split(b"\n")):
                return None  # ragged rows: the exact path names the first one
            values = [float(cell) for cell in data.replace(b"\n", b",").split(b",")]
            matrix = np.array(values, dtype=np.float64).reshape(rows, feature_dim)
        else:
            matrix = _arrow_csv(data, feature_dim)
    except (ValueError, pa.ArrowException):
        return None
    return matrix if len(matrix) == rows and np.isfinite(matrix).all() else None


def _arrow_csv(data: bytes, feature_dim: int) -> np.ndarray:
    """Large bodies: pyarrow's multi-threaded CSV reader, every column float64, no nulls."""
    names = [f"f{i}" for i in range(feature_dim)]
    table = pa_csv.read_csv(
        io.BytesIO(data),
        read_options=pa_csv.ReadOptions(column_names=names),
        parse_options=pa_csv.ParseOptions(quote_char=False, double_quote=False),
        convert_options=pa_csv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.float64()), null_values=[], strings_can_be_null=False
        ),
    )
    matrix = np.empty((table.num_rows, feature_dim), dtype=np.float64)
    for index, column in enumerate(table.columns):
        matrix[:, index] = column.to_numpy()
    return matrix


def _fast_json(body: bytes, kind: str, feature_dim: int) -> np.ndarray | None:
    """orjson + one numpy conversion for well-formed instances; None for anything unusual.

    ``true``/``false`` anywhere send the body to the exact path, which refuses booleans as
    features (numpy would read them as 1 and 0); so do strings, NaN literals and huge integers.
    """
    if b"true" in body or b"false" in body:
        return None
    try:
        if kind == JSON:
            document = orjson.loads(body)
            instances = document["instances"]
            if not isinstance(instances, list):
                return None
        else:
            instances = [orjson.loads(line) for line in body.splitlines() if line.strip()]
        rows = [_instance_features(instance, i, feature_dim) for i, instance in enumerate(instances)]
    except (orjson.JSONDecodeError, TypeError, KeyError, InvalidInput):
        return None
    if not rows:
        return None
    try:
        matrix = np.array(rows)
    except (ValueError, OverflowError):
        return None
    if matrix.ndim != 2 or matrix.shape[1] != feature_dim or matrix.dtype.kind not in "iuf":
        return None
    matrix = matrix.astype(np.float64, copy=False)
    return matrix if np.isfinite(matrix).all() else None


def _refuse_too_many_rows(body: bytes, kind: str, max_rows: int) -> None:
    """Cheap upper bound on the row count, checked before anything is parsed.

    CSV and JSON Lines rows end with ``\n``, ``\r\n`` or a lone ``\r`` (both parsers split on it);
    every JSON instance form (``{"features": [...]}``, a bare ``[...]``, ``{"data": {"features":
    [...]}}``, ``{"data": {"features": {"values": [...]}}}``) opens one array, and ``instances`` one
    more; a sparse instance opens two more, after its ``"keys"`` and ``"shape"``.
    """
    estimate = body.count(b"[") - 1 if kind == JSON else max(body.count(b"\n"), body.count(b"\r"))
    if estimate > max_rows + 1 and kind == JSON:
        estimate -= body.count(b'"keys"') + body.count(b'"shape"')
    if estimate > max_rows + 1:
        raise _too_many(estimate, max_rows)


def _too_many(rows: int, max_rows: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request holds about {rows} rows; at most {max_rows} are accepted per request (send batches)",
        details={"rows": rows, "limit": max_rows},
    )


def _csv_rows(text: str) -> list[list[Any]]:
    try:
        frame = pd.read_csv(io.StringIO(text), header=None, dtype=str, keep_default_na=False, skip_blank_lines=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InvalidInput(f"the CSV body is not valid: {str(exc).strip()}") from exc
    return frame.to_numpy().tolist()  # type: ignore[no-any-return]


def _load_json(text: str, where: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{where}: not valid JSON ({exc.msg} at position {exc.pos})") from exc
    except RecursionError as exc:
        raise InvalidInput(f"{where}: JSON nested too deeply") from exc
    return value


def _json_rows(text: str, feature_dim: int) -> list[Any]:
    document = _load_json(text, "body")
    if not isinstance(document, dict) or not isinstance(document.get("instances"), list):
        raise InvalidInput('the JSON body must be {"instances": [{"features": [...]}, ...]}')
    return [_instance_features(instance, i, feature_dim) for i, instance in enumerate(document["instances"])]


def _instance_features(instance: Any, row: int, feature_dim: int) -> Any:
    """One instance's features as a list: ``{"features": element}``, ``{"data": {"features":
    element}}`` or a bare list, where element is a list or the protobuf-equivalent object."""
    if isinstance(instance, list):
        return instance
    if isinstance(instance, dict):
        features = instance.get("features")
        if features is None:
            data = instance.get("data")
            features = data.get("features") if isinstance(data, dict) else None
        if isinstance(features, list):
            return features
        if isinstance(features, dict):
            return _tensor_features(features, row, feature_dim)
    raise InvalidInput(
        f'instance {row}: expected {{"features": [numbers]}} or {{"data": {{"features": ...}}}}', details={"row": row}
    )


def _tensor_features(element: dict[str, Any], row: int, feature_dim: int) -> list[Any]:
    """SageMaker's protobuf-equivalent JSON element: dense ``{"values": [...]}`` (``shape``, if
    given, ``[feature_dim]``), or sparse ``{"keys": [...], "shape": [feature_dim], "values": [...]}``."""
    where = {"row": row}
    values, keys, shape = element.get("values"), element.get("keys"), element.get("shape")
    for name, part in (("values", values), ("keys", keys), ("shape", shape)):
        if part is not None and not isinstance(part, list):
            raise InvalidInput(f"instance {row}: {name} must be a list", details=where)
    if values is None:
        raise InvalidInput(f'instance {row}: the features object has no "values"', details=where)
    if shape is not None and shape != [feature_dim]:
        raise InvalidInput(
            f"instance {row}: shape {_shown(shape)} does not match the model's {feature_dim} features "
            f"(send [{feature_dim}])",
            details={**where, "expected": [feature_dim]},
        )
    if not keys:
        if not values and shape is not None:
            return [0.0] * feature_dim  # a sparse row with no stored value
        return values
    if shape is None:
        raise InvalidInput(f"instance {row}: a sparse row (keys) needs a shape; send [{feature_dim}]", details=where)
    if len(keys) != len(values):
        raise InvalidInput(f"instance {row}: {len(keys)} keys but {len(values)} values", details=where)
    dense: list[Any] = [0.0] * feature_dim
    seen: set[int] = set()
    for key, value in zip(keys, values, strict=True):
        if isinstance(key, bool) or not isinstance(key, int):
            raise InvalidInput(f"instance {row}: key {_shown(key)} is not an integer", details=where)
        if not 0 <= key < feature_dim:
            raise InvalidInput(
                f"instance {row}: key {_shown(key)} is out of range for shape [{feature_dim}] "
                f"(keys are 0 to {feature_dim - 1})",
                details={**where, "key": key if abs(key) < 2**63 else str(key)},
            )
        if key in seen:
            raise InvalidInput(f"instance {row}: key {key} appears more than once", details={**where, "key": key})
        seen.add(key)
        dense[key] = value
    return dense


def _matrix(rows: list[Any], feature_dim: int) -> np.ndarray:
    if not rows:
        raise InvalidInput("the request holds no rows")
    matrix = np.empty((len(rows), feature_dim), dtype=np.float64)
    for index, row in enumerate(rows):
        if len(row) != feature_dim:
            raise InvalidInput(
                f"row {index} has {len(row)} features; the model expects {feature_dim}",
                details={"row": index, "features": len(row), "expected": feature_dim},
            )
        for column, value in enumerate(row):
            matrix[index, column] = _number(value, index, column)
    return matrix


def _number(value: Any, row: int, column: int) -> float:
    where = {"row": row, "column": column}
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidInput(f"row {row} feature {column}: {_shown(value)} is not a number", details=where)
    try:
        number = float(value)
    except (ValueError, OverflowError) as exc:
        raise InvalidInput(f"row {row} feature {column}: {_shown(value)} is not a number", details=where) from exc
    if not math.isfinite(number):
        raise InvalidInput(f"row {row} feature {column}: {_shown(value)} is not a finite number", details=where)
    return number


def _shown(value: Any) -> str:
    """The offending value for an error message, cut short (a cell can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= 64 else f"{text[:30]}...({len(text)} characters)"


def render(prediction: Prediction, kind: str) -> bytes:
    """SageMaker's response body for ``kind``; clusters are floats, as SageMaker writes them."""
    if kind == RECORDIO:
        return recordio.write_predictions(prediction.closest_cluster, prediction.distance_to_cluster)
    clusters = prediction.closest_cluster.astype(np.float64).tolist()
    distances = prediction.distance_to_cluster.astype(np.float64).tolist()
    if kind == CSV:
        return "".join(f"{c!r},{d!r}\n" for c, d in zip(clusters, distances, strict=True)).encode()
    records = [{"closest_cluster": c, "distance_to_cluster": d} for c, d in zip(clusters, distances, strict=True)]
    if kind == JSONLINES:
        return b"".join(orjson.dumps(record) + b"\n" for record in records)
    return orjson.dumps({"predictions": records})
