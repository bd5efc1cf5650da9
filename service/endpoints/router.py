"""HTTP routes of endpoints: lifecycle, SageMaker-style invocations, friendly predictions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from schemas.common import NOT_CONFIGURED_RESPONSE, LimitQuery, OffsetQuery, Page, error_responses
from schemas.endpoints import (
    STREAMED_PREDICTION_CSV,
    STREAMED_PREDICTION_LINES,
    Endpoint,
    EndpointCreate,
    EndpointModelSwitch,
    EndpointStatus,
    InvocationResponse,
    PredictionRequest,
    PredictionResponse,
)
from service.db.tables import EndpointTable
from service.deps import AppState, app_state, db_session
from service.endpoints.invocations import (
    CSV,
    JSON,
    JSONLINES,
    RECORDIO,
    request_format,
    response_format,
)
from service.endpoints.service import EndpointService
from service.endpoints.serving import ServingService
from service.errors import PayloadTooLarge, UnsupportedMediaType
from service.media_types import media_type
from service.request_bodies import parse_json, validate
from service.request_context import current_request_id
from service.streaming import is_streamed, negotiate, streamed_content

router = APIRouter(prefix="/endpoints", tags=["endpoints"])
# The hot paths, in a router of their own that the app includes before every other: routes are
# matched one by one, and these should not wait behind the lifecycle routes.
hot = APIRouter(prefix="/endpoints", tags=["endpoints"])
INLINE_BODY_BYTES = 16 * 1024  # smaller requests for a known endpoint are answered on the event loop


def endpoint_service(session: Session = Depends(db_session), state: AppState = Depends(app_state)) -> EndpointService:
    return EndpointService(session, state.store, state.backends, state.catalog, state.serving)


EndpointServiceDep = Annotated[EndpointService, Depends(endpoint_service)]


def view(row: EndpointTable) -> Endpoint:
    return Endpoint.model_validate(row, from_attributes=True)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Endpoint,
    summary="Deploy a model to a new endpoint",
    responses={**error_responses(400, 404, 422), 409: NOT_CONFIGURED_RESPONSE},
)
def create_endpoint(request: EndpointCreate, service: EndpointServiceDep) -> Endpoint:
    """The endpoint starts `Creating`; a worker loads the model and makes it `InService`."""
    return view(service.create(request))


@router.get("", response_model=Page[Endpoint], summary="List endpoints", responses=error_responses(422))
def list_endpoints(
    service: EndpointServiceDep,
    status_filter: Annotated[EndpointStatus | None, Query(alias="status")] = None,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 50,
) -> Page[Endpoint]:
    rows, total = service.page(offset, limit, status_filter)
    return Page[Endpoint](items=[view(r) for r in rows], total=total, offset=offset, limit=limit)


@router.get("/{name}", response_model=Endpoint, summary="Describe an endpoint", responses=error_responses(404, 422))
def get_endpoint(name: str, service: EndpointServiceDep) -> Endpoint:
    return view(service.get(name))


@router.put(
    "/{name}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Endpoint,
    summary="Switch an endpoint to another model",
    responses=error_responses(404, 409, 422),
)
def switch_model(name: str, request: EndpointModelSwitch, service: EndpointServiceDep) -> Endpoint:
    """The endpoint becomes `Updating`; the current model keeps serving every request until the
    new one is loaded, then the switch is atomic. No request fails during the switch. A model with
    other feature names than the endpoint serves gets 409 naming both lists, unless the request sets
    `allow_feature_change: true`."""
    return view(service.switch_model(name, request.model_id, allow_feature_change=request.allow_feature_change))


@router.delete(
    "/{name}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Endpoint,
    summary="Delete an endpoint",
    responses=error_responses(404, 422),
)
def delete_endpoint(name: str, service: EndpointServiceDep) -> Endpoint:
    """The endpoint becomes `Deleting`; a worker removes it (and its SageMaker resources)."""
    return view(service.delete(name))


_RECORDIO_SCHEMA: dict[str, Any] = {
    "type": "string",
    "format": "binary",
    "description": "SageMaker's RecordIO-wrapped aialgs.data.Record protobuf (the SageMaker SDK's default for "
    "KMeansPredictor): one record per row, features['values'] a float32, float64 or int32 tensor, dense or "
    "sparse (keys, shape).",
}
_INSTANCE_SCHEMA: dict[str, Any] = {
    "description": "SageMaker's common inference format: {'features': [...]}, a bare list, or {'data': "
    "{'features': element}} where element is a list, {'values': [...]} or the sparse {'keys': [...], 'shape': "
    "[feature count], 'values': [...]}.",
    "anyOf": [
        {"type": "array", "items": {"type": "number"}},
        {"type": "object", "properties": {"features": {"type": "array", "items": {"type": "number"}}}},
        {
            "type": "object",
            "properties": {
                "data": {
                    "type": "object",
                    "properties": {
                        "features": {
                            "anyOf": [
                                {"type": "array", "items": {"type": "number"}},
                                {
                                    "type": "object",
                                    "required": ["values"],
                                    "properties": {
                                        "values": {"type": "array", "items": {"type": "number"}},
                                        "keys": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                                        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                                    },
                                },
                            ]
                        }
                    },
                }
            },
        },
    ],
}
_INVOCATION_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            CSV: {"schema": {"type": "string"}, "example": "13.2,236,58,21.2,-0.85\n10.0,263,48,44.5,-1.0\n"},
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["instances"],
                    "properties": {
                        "instances": {"type": "array", "items": _INSTANCE_SCHEMA},
                    },
                },
                "example": {"instances": [{"features": [13.2, 236, 58, 21.2, -0.85]}]},
            },
            JSONLINES: {
                "schema": {
                    "type": "string",
                    "description": "JSON Lines (UTF-8): one instance per line, in any form `application/json` accepts.",
                },
                "example": '{"features": [13.2, 236, 58, 21.2, -0.85]}\n',
            },
            RECORDIO: {"schema": _RECORDIO_SCHEMA},
        },
    }
}


@hot.post(
    "/{name}/invocations",
    response_model=InvocationResponse,
    summary="SageMaker-compatible inference",
    responses={
        200: {
            "content": {
                JSONLINES: {
                    "schema": {"type": "string"},
                    "example": '{"closest_cluster": 1.0, "distance_to_cluster": 3.2}\n',
                },
                CSV: {"schema": {"type": "string"}, "example": "1.0,3.2\n"},
                RECORDIO: {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": "One RecordIO-wrapped aialgs.data.Record per row: label['closest_cluster'] "
                        "and label['distance_to_cluster'], each a one-value float32 tensor.",
                    }
                },
            }
        },
        **error_responses(400, 404, 406, 409, 413, 415, 422),
    },
    openapi_extra=_INVOCATION_BODY,
)
async def invoke(name: str, request: Request) -> Response:
    """SageMaker KMeans's inference contract: send `text/csv`, `application/json`,
    `application/jsonlines` or `application/x-recordio-protobuf` rows of features (JSON instances
    dense or sparse, as SageMaker's common data formats define them); get `closest_cluster` and
    `distance_to_cluster` (Euclidean) per row, as JSON (default), JSON Lines, CSV or RecordIO-protobuf
    per `Accept`. A client written for a SageMaker endpoint (the SageMaker SDK's `KMeansPredictor`
    included) works by changing only the URL."""
    serving = serving_of(request)
    request_kind = request_format(request.headers.get("content-type"))
    response_kind = response_format(request.headers.get("accept"))
    body = await request.body()
    if len(body) <= INLINE_BODY_BYTES and serving.catalog.lookup(name) is not None:
        content = serving.invoke(name, body, request_kind, response_kind)
    else:
        content = await run_in_threadpool(serving.invoke, name, body, request_kind, response_kind)
    return Response(content=content, media_type=response_kind)


_PREDICTION_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {JSON: {"schema": PredictionRequest.model_json_schema()}}}
}


def parse_prediction_request(body: bytes, max_rows: int) -> PredictionRequest:
    """The request, refused with 413 *before* parsing when it holds more rows than allowed.

    FastAPI would build every row as a dict before the handler could count them (1e6 tiny rows,
    13 MB of JSON, take ~400 MB); every row is a JSON object, so counting ``{`` bounds the rows.
    """
    estimate = body.count(b"{") - 1
    if estimate > max_rows:
        raise PayloadTooLarge(
            f"the request holds about {estimate} rows; at most {max_rows} are accepted per request (send batches)",
            details={"rows": estimate, "limit": max_rows},
        )
    return validate(PredictionRequest, parse_json(body), ("body",))


_PREDICTION_STREAM_CONTENT = streamed_content(
    STREAMED_PREDICTION_LINES,
    STREAMED_PREDICTION_CSV,
    "One `RowPrediction` object per line (`distances` only with `include_distances`); a failure after "
    'the first line ends the stream with one `{"error": {...}}` line.',
)


@hot.post(
    "/{name}/predictions",
    response_model=PredictionResponse,
    summary="Cluster assignments for rows or a dataset, labelled by key",
    responses={
        200: {
            "description": "JSON (default); for a `dataset_id`, JSON Lines or CSV per `Accept`, streamed, any size.",
            "content": _PREDICTION_STREAM_CONTENT,
        },
        **error_responses(400, 404, 406, 409, 413, 415, 422),
    },
    openapi_extra=_PREDICTION_BODY,
)
async def predictions(name: str, request: Request) -> Response:
    """Rows (objects keyed by feature name) or a `dataset_id`; `raw: true` applies the model's
    preprocessing first. `sort: "cluster,distance"` gives the workshop's ordering, and
    `cluster_counts` the number of rows per cluster. More than `CENTROID_MAX_INVOCATION_ROWS`
    rows get 413 before the body is parsed; keys other than the model's columns get 400.

    **Streaming a dataset.** With a `dataset_id` and `Accept: application/jsonlines` (or its aliases
    `application/x-jsonlines`, `application/x-ndjson`, `application/jsonl`) or `Accept: text/csv`,
    every row of the dataset comes back as one line, streamed while it is computed: no row cap,
    memory independent of the dataset's size. JSON Lines: `{"key": ..., "closest_cluster": ...,
    "distance_to_cluster": ...}` (`"distances": [...]` with `include_distances`); CSV: a header row
    `key,closest_cluster,distance_to_cluster` (then `distances_0`...), one row per line. There are no
    `cluster_counts` in these forms. Problems found before the first line (unknown dataset, missing or
    non-numeric columns, nulls or non-finite values the Parquet statistics reveal) get their usual
    status; one found later ends the stream with a last line `{"error": {...}}` (CSV: `#error `
    followed by that JSON). `sort` works at any size too: above `CENTROID_MAX_INVOCATION_ROWS` rows
    the rows are sorted on disk (the first line comes once every row is predicted and sorted).
    `include_distances` is bounded per batch of rows rather than per request. Rows requests are
    answered in JSON whatever `Accept` says."""
    content_type = media_type(request.headers.get("content-type"))
    if content_type not in ("", JSON) and not content_type.endswith("+json"):
        raise UnsupportedMediaType(f"unsupported Content-Type {content_type!r}; send {JSON}")
    state = app_state(request)
    body = await request.body()
    if len(body) <= INLINE_BODY_BYTES and state.catalog.lookup(name) is not None:
        payload = parse_prediction_request(body, state.settings.max_invocation_rows)
        if payload.rows is not None and payload.dataset_id is None:
            return Response(state.serving.predict_rows(name, payload), media_type=JSON)
    else:
        payload = await run_in_threadpool(parse_prediction_request, body, state.settings.max_invocation_rows)
    if payload.dataset_id is not None and payload.rows is None:
        answer = negotiate(request.headers.get("accept"))
        if is_streamed(answer):
            request_id = current_request_id()
            lines = await run_in_threadpool(_dataset_stream, state, name, payload, answer, request_id)
            return StreamingResponse(lines, media_type=answer)
    content = await run_in_threadpool(_dataset_or_rows, state, name, payload)
    return Response(content, media_type=JSON)


def _dataset_or_rows(state: AppState, name: str, payload: PredictionRequest) -> bytes:
    with state.database.session() as session:
        return _endpoint_service(state, session).dataset_predictions(name, payload)


def _dataset_stream(
    state: AppState, name: str, payload: PredictionRequest, answer: str, request_id: str | None
) -> Iterator[bytes]:
    """Checks everything it can (in a worker thread), then hands back the lines to stream; the
    database session is closed before the first line is computed."""
    with state.database.session() as session:
        return _endpoint_service(state, session).stream_dataset_predictions(name, payload, answer, request_id)


def _endpoint_service(state: AppState, session: Session) -> EndpointService:
    return EndpointService(session, state.store, state.backends, state.catalog, state.serving)


def serving_of(request: Request) -> ServingService:
    return app_state(request).serving
