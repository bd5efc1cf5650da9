"""SageMaker KMeans's inference contract: request parsing and response rendering.

Requests: ``text/csv`` (rows of numbers, no header), ``application/json``
(``{"instances": [{"features": [...]}, ...]}``, or the dense ``{"data": {"features": {"values":
[...]}}}`` form) or ``application/jsonlines`` (one instance object per line). Responses, by
``Accept``: ``application/json`` (default) ``{"predictions": [{"closest_cluster": 1.0,
"distance_to_cluster": 3.2}, ...]}``, ``application/jsonlines`` or ``text/csv``.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from service.engine import Prediction
from service.errors import InvalidInput, NotAcceptable, PayloadTooLarge, UnsupportedMediaType

JSON = "application/json"
JSONLINES = "application/jsonlines"
CSV = "text/csv"
REQUEST_TYPES = {CSV: CSV, JSON: JSON, JSONLINES: JSONLINES, "application/x-jsonlines": JSONLINES}
RESPONSE_TYPES = (JSON, JSONLINES, CSV)


def media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


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
    """The request's feature matrix, shape (rows, feature_dim), finite float64."""
    if not body.strip():
        raise InvalidInput("the request body is empty")
    _refuse_too_many_rows(body, kind, max_rows)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the request body is not UTF-8 (invalid byte at offset {exc.start})") from exc
    if kind == CSV:
        rows = _csv_rows(text)
    elif kind == JSON:
        rows = _json_rows(text)
    else:
        rows = [
            _instance_features(_load_json(line, f"line {i}"), i)
            for i, line in enumerate(text.splitlines())
            if line.strip()
        ]
    if len(rows) > max_rows:
        raise _too_many(len(rows), max_rows)
    return _matrix(rows, feature_dim)


def _refuse_too_many_rows(body: bytes, kind: str, max_rows: int) -> None:
    """Cheap upper bound on the row count, checked before anything is parsed.

    CSV and JSON Lines rows end with ``\n``, ``\r\n`` or a lone ``\r`` (both parsers split on it);
    every JSON instance form (``{"features": [...]}``, a bare ``[...]``, the dense
    ``{"data": {"features": {"values": [...]}}}``) opens exactly one array, and ``instances`` one more.
    """
    estimate = body.count(b"[") - 1 if kind == JSON else max(body.count(b"\n"), body.count(b"\r"))
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


def _json_rows(text: str) -> list[Any]:
    document = _load_json(text, "body")
    if not isinstance(document, dict) or not isinstance(document.get("instances"), list):
        raise InvalidInput('the JSON body must be {"instances": [{"features": [...]}, ...]}')
    return [_instance_features(instance, i) for i, instance in enumerate(document["instances"])]


def _instance_features(instance: Any, row: int) -> Any:
    """Accept {"features": [...]}, {"data": {"features": {"values": [...]}}}, or a bare list."""
    if isinstance(instance, list):
        return instance
    if isinstance(instance, dict):
        if isinstance(instance.get("features"), list):
            return instance["features"]
        data = instance.get("data")
        if isinstance(data, dict) and isinstance(data.get("features"), dict):
            values = data["features"].get("values")
            if isinstance(values, list):
                return values
    raise InvalidInput(f'instance {row}: expected {{"features": [numbers]}}', details={"row": row})


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
    clusters = prediction.closest_cluster.astype(np.float64).tolist()
    distances = prediction.distance_to_cluster.astype(np.float64).tolist()
    if kind == CSV:
        return "".join(f"{c!r},{d!r}\n" for c, d in zip(clusters, distances, strict=True)).encode()
    records = [{"closest_cluster": c, "distance_to_cluster": d} for c, d in zip(clusters, distances, strict=True)]
    if kind == JSONLINES:
        return "".join(json.dumps(record) + "\n" for record in records).encode()
    return json.dumps({"predictions": records}).encode()
