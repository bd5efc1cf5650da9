"""HTTP routes of models."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from sqlalchemy.orm import Session

from schemas.common import LimitQuery, OffsetQuery, Page, error_responses
from schemas.datasets import NAME_SCHEMA, Name
from schemas.models import (
    STREAMED_ASSIGNMENT_CSV,
    STREAMED_ASSIGNMENT_LINES,
    Assignments,
    Centroids,
    Model,
    ModelListItem,
)
from service.deps import AppState, app_state, db_session
from service.errors import UnsupportedMediaType
from service.http_cache import (
    Rendered,
    RenderedCache,
    cache_headers,
    content_etag,
    etag_matches,
    if_none_match,
    not_modified,
    openapi_cache_headers,
    openapi_not_modified,
    strong_etag,
)
from service.media_types import media_type
from service.models.service import ModelService, StreamedAssignments, batch_rows
from service.request_bodies import read_upload
from service.request_context import current_request_id
from service.streaming import JSON, is_streamed, negotiate, streamed_content

router = APIRouter(prefix="/models", tags=["models"])
# The hot path, in a router the app includes before the others (routes are matched in order).
hot = APIRouter(prefix="/models", tags=["models"])


def model_service(session: Session = Depends(db_session), state: AppState = Depends(app_state)) -> ModelService:
    return _model_service(state, session)


def _model_service(state: AppState, session: Session) -> ModelService:
    settings = state.settings
    return ModelService(
        session,
        state.store,
        max_model_bytes=settings.max_model_bytes,
        max_k=settings.max_k,
        max_centroid_values=settings.max_centroid_values,
        rows_per_batch=batch_rows(settings.parquet_row_group_rows),
    )


ModelServiceDep = Annotated[ModelService, Depends(model_service)]


def _cacheable(ok: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries of an immutable read: 200 with ETag/Cache-Control, and 304."""
    return {200: {**(ok or {}), "headers": openapi_cache_headers()}, 304: openapi_not_modified()}


def rendered_cache(request: Request) -> RenderedCache:
    """The app's cache of rendered immutable reads (the fast lane answers hits from it too)."""
    return app_state(request).rendered_reads


def _rendered_assignments(
    state: AppState, cache: RenderedCache, key: tuple[str, str | None, int | None], generation: int
) -> Rendered:
    """Compute and render one assignments body (in a worker thread), once per key and generation."""
    with cache.flight(key):
        if generation >= 0:
            hit = cache.get(key, generation)
            if hit is not None:
                return hit
        model_id, dataset_id, cluster = key
        with contextmanager(db_session)(state) as session:
            service = _model_service(state, session)
            data = service.assignments_data(service.get(model_id), dataset_id, cluster)
        body = orjson.dumps(data)
        rendered = Rendered(content_etag(body), body, generation)
        if generation >= 0:  # the catalog has read the generation: deletions will reach this entry
            cache.put(key, rendered)
        return rendered


_ASSIGNMENTS_QUERY: list[dict[str, Any]] = [
    {
        "name": "cluster",
        "in": "query",
        "required": False,
        "description": "Only rows of this cluster.",
        "schema": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}], "title": "Cluster"},
    },
    {
        "name": "dataset_id",
        "in": "query",
        "required": False,
        "description": "Another dataset with the same features.",
        "schema": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}], "title": "Dataset Id"},
    },
]
_QUERY_VALIDATORS: dict[str, TypeAdapter[Any]] = {
    "cluster": TypeAdapter(Annotated[int, Field(ge=0)]),
    "dataset_id": TypeAdapter(Annotated[str, Field(max_length=40)]),
}


class StreamedRepresentation(Exception):
    """The request asks for a streamed form of the assignments (JSON Lines, CSV): the cached JSON
    body cannot answer it, so the fast lane hands it on to the route."""


_JSON_ACCEPTS = frozenset({"", "*/*", JSON, "application/json, */*"})


def assignments_query(request: Request) -> tuple[int | None, str | None]:
    """``cluster`` and ``dataset_id`` for an answer in JSON (what the fast lane serves from the cache).

    Raises :class:`StreamedRepresentation` when ``Accept`` asks for another form, and the errors of
    :func:`assignments_params` for invalid parameters: either way the route then answers. The usual
    ``Accept`` values (none, ``*/*``, ``application/json``) cost one header lookup.
    """
    accept = request.headers.get("accept", "")
    if accept not in _JSON_ACCEPTS and negotiate(accept) != JSON:
        raise StreamedRepresentation(accept)
    return assignments_params(request)


def assignments_params(request: Request) -> tuple[int | None, str | None]:
    """``cluster`` and ``dataset_id``, validated as FastAPI would (422 with the same details).

    Parsed here rather than declared as ``Query`` parameters: on this hot path FastAPI's
    parameter machinery costs more than answering from the cache. They are documented through
    ``openapi_extra``. No query string (the common case) costs nothing.
    """
    if not request.scope.get("query_string"):
        return None, None
    params = request.query_params
    values: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name, adapter in _QUERY_VALIDATORS.items():
        raw = params.get(name)
        if raw is None:
            continue
        try:
            values[name] = adapter.validate_python(raw)
        except ValidationError as exc:
            errors.extend({**e, "loc": ("query", name, *e["loc"])} for e in exc.errors(include_url=False))
    if errors:
        raise RequestValidationError(errors)
    return values.get("cluster"), values.get("dataset_id") or None


def _assignments_stream(
    state: AppState, model_id: str, dataset_id: str | None, cluster: int | None, answer: str, request_id: str | None
) -> StreamedAssignments:
    """Check everything checkable (in a worker thread) and hand back the lines to stream; the
    database session is closed before the first line is computed."""
    with contextmanager(db_session)(state) as session:
        service = _model_service(state, session)
        return service.assignments_stream(service.get(model_id), dataset_id, cluster, answer, request_id)


_ASSIGNMENTS_STREAMED = streamed_content(
    STREAMED_ASSIGNMENT_LINES,
    STREAMED_ASSIGNMENT_CSV,
    "One `Assignment` object per line; a failure after the first line ends the stream with one "
    '`{"error": {...}}` line.',
)


# The hot path is registered first: routes are matched in registration order.
@hot.get(
    "/{model_id}/assignments",
    response_model=Assignments,
    summary="Key → cluster map of the training dataset (or another dataset)",
    responses={
        **_cacheable(
            {
                "description": "JSON (default), or JSON Lines or CSV per `Accept`, streamed, any size.",
                "content": _ASSIGNMENTS_STREAMED,
            }
        ),
        **error_responses(400, 404, 406, 422),
    },
    openapi_extra={"parameters": _ASSIGNMENTS_QUERY},
)
async def get_assignments(model_id: str, request: Request) -> Response:
    """Computed once per model, dataset and cluster filter, then answered from memory (no database)
    until the model or the dataset is deleted. Answered with an `ETag` (of the exact bytes) and
    `Cache-Control`; `If-None-Match` gives 304.

    **Streaming.** With `Accept: application/jsonlines` (or `application/x-jsonlines`,
    `application/x-ndjson`, `application/jsonl`) or `Accept: text/csv`, every row comes back as one
    line `{"key": ..., "closest_cluster": ..., "distance_to_cluster": ...}` (CSV: a header row
    `key,closest_cluster,distance_to_cluster`, then one row per line), computed while it is sent:
    any number of rows, memory independent of them, nothing cached. `cluster` filters the lines.
    The per-cluster `counts` are only in the JSON form (for the training dataset, the model's
    `cluster_sizes` hold them too). An error found after the first line ends the stream with a line
    `{"error": {...}}` (CSV: `#error ` and that JSON). Streamed bodies carry an `ETag` too."""
    cluster, dataset_id = assignments_params(request)
    answer = negotiate(request.headers.get("accept"))
    state: AppState = request.app.state.centroid
    if is_streamed(answer):
        return await _streamed_assignments(request, state, model_id, dataset_id, cluster, answer)
    cache = rendered_cache(request)
    key = (model_id, dataset_id, cluster)
    generation = state.catalog.generation
    rendered = cache.get(key, generation) if generation >= 0 else None
    if rendered is None:
        rendered = await run_in_threadpool(_rendered_assignments, state, cache, key, generation)
    if etag_matches(if_none_match(request.headers), rendered.etag):
        return not_modified(rendered.etag)
    return rendered.response()


async def _streamed_assignments(
    request: Request, state: AppState, model_id: str, dataset_id: str | None, cluster: int | None, answer: str
) -> Response:
    streamed = await run_in_threadpool(
        _assignments_stream, state, model_id, dataset_id, cluster, answer, current_request_id()
    )
    # Models and datasets are immutable and the rendering deterministic: these identify the bytes.
    etag = strong_etag(
        streamed.model_id, streamed.artifact_sha256, streamed.dataset_id, str(cluster), answer, "assignments-lines"
    )
    if etag_matches(if_none_match(request.headers), etag):
        streamed.body.close()
        return not_modified(etag)
    # The JSON form is at the same URL: caches must key on Accept.
    return StreamingResponse(streamed.body, media_type=answer, headers={**cache_headers(etag), "Vary": "Accept"})


#: Python's whitespace (``str.strip()``), spelled for ECMA-262 and Python regular expressions alike.
_SPACE = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_JSON_TEXT = r'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"'
_JSON_SPACE = r"[ \t\n\r]*"
#: ``feature_names`` as :meth:`ImportForm._split` reads it: comma-separated names, or (starting with
#: ``[``) a JSON list of at least one string. Published as the schema's ``pattern``.
FEATURE_NAMES_PATTERN = (
    rf"^[{_SPACE}]*(?:[^\[{_SPACE}][\s\S]*|\[{_JSON_SPACE}{_JSON_TEXT}(?:{_JSON_SPACE},{_JSON_SPACE}{_JSON_TEXT})*"
    rf"{_JSON_SPACE}\][{_SPACE}]*)?$"
)


class ImportForm(BaseModel):
    """The non-file fields of a model import (another field is a 422: the schema lists them all)."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    feature_names: list[str] = Field(min_length=1)
    key_column: str | None = Field(default=None, max_length=256)

    @field_validator("feature_names", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """Accept a JSON list or a comma-separated string."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not a JSON list: {exc.msg}") from exc
                except RecursionError as exc:
                    raise ValueError("not a JSON list: nested too deeply") from exc
            return [part.strip() for part in text.split(",")]
        return value


_IMPORT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "name", "feature_names"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A SageMaker KMeans model.tar.gz (what SageMaker writes, or Centroid's "
                            "`GET /models/{id}/artifact`); any other file is answered 400 `invalid_input`.",
                        },
                        "name": {**NAME_SCHEMA, "example": "from-sagemaker"},
                        "feature_names": {
                            "type": "string",
                            "pattern": FEATURE_NAMES_PATTERN,
                            "description": "Comma-separated or JSON list, one name per centroid coordinate (as many "
                            "as the model has; 400 otherwise).",
                            "example": "Murder,Assault,UrbanPop,Rape,DensityPerMile",
                        },
                        "key_column": {"type": "string", "maxLength": 256, "example": "State"},
                    },
                }
            }
        },
    }
}


@router.get("", response_model=Page[ModelListItem], summary="List models, newest first", responses=error_responses(422))
def list_models(
    service: ModelServiceDep,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 50,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> Page[ModelListItem]:
    """Items describe each model without its centroids (`GET /models/{id}/centroids` has them) and
    without its recipe (`GET /models/{id}`); the listing reads neither from the database, so it
    stays fast and small whatever the models' sizes."""
    rows, total = service.page(offset, limit, name)
    items = [ModelListItem.model_validate(r, from_attributes=True) for r in rows]
    return Page[ModelListItem](items=items, total=total, offset=offset, limit=limit)


@router.post(
    "/import",
    status_code=status.HTTP_201_CREATED,
    response_model=Model,
    summary="Import a SageMaker KMeans model.tar.gz",
    responses=error_responses(400, 413, 415, 422, 507),
    openapi_extra=_IMPORT_BODY,
)
async def import_model(request: Request, service: ModelServiceDep) -> Model:
    """Upload a `model.tar.gz` written by SageMaker's KMeans (or exported by Centroid) with
    the feature names; the model can then be deployed on a local endpoint. A model with more than
    `CENTROID_MAX_K` centroids, or more than `CENTROID_MAX_CENTROID_VALUES` numbers (k × feature_dim),
    gets 400, read from the archive's header before the centroids are."""
    if media_type(request.headers.get("content-type")) != "multipart/form-data":
        raise UnsupportedMediaType("send the model as multipart/form-data (fields file, name, feature_names)")
    upload, fields = await read_upload(request, ImportForm, "the model.tar.gz")
    row = await run_in_threadpool(
        service.import_artifact, fields.name, upload.data, fields.feature_names, fields.key_column
    )
    return Model.model_validate(row, from_attributes=True)


@router.get(
    "/{model_id}",
    response_model=Model,
    summary="Describe a model",
    responses={**_cacheable(), **error_responses(404, 422)},
)
def get_model(model_id: str, request: Request, response: Response, service: ModelServiceDep) -> Model | Response:
    """Without the centroids (see `/centroids`); `cluster_sizes` has k entries, at most `CENTROID_MAX_K`.
    Immutable: answered with an `ETag` and `Cache-Control`; `If-None-Match` gives 304."""
    row = service.get(model_id)
    etag = strong_etag(row.id, row.artifact_sha256, "model")
    if etag_matches(if_none_match(request.headers), etag):
        return not_modified(etag)
    response.headers.update(cache_headers(etag))
    return Model.model_validate(row, from_attributes=True)


@router.get(
    "/{model_id}/centroids",
    response_model=Centroids,
    summary="A model's centroids, scaled and in original units",
    responses={**_cacheable(), **error_responses(404, 422)},
)
def get_centroids(
    model_id: str, request: Request, response: Response, service: ModelServiceDep
) -> Centroids | Response:
    """Immutable: answered with an `ETag` and `Cache-Control`; `If-None-Match` gives 304."""
    row = service.get(model_id)
    etag = strong_etag(row.id, row.artifact_sha256, "centroids")
    if etag_matches(if_none_match(request.headers), etag):
        return not_modified(etag)
    response.headers.update(cache_headers(etag))
    return service.centroids(row)


@router.get(
    "/{model_id}/artifact",
    response_class=FileResponse,
    summary="Download the SageMaker-format model.tar.gz",
    responses={
        **_cacheable({"content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}}),
        **error_responses(404, 422),
    },
)
def get_artifact(model_id: str, request: Request, service: ModelServiceDep) -> Response:
    """Immutable: answered with an `ETag` and `Cache-Control`; `If-None-Match` gives 304."""
    row = service.get(model_id)
    etag = strong_etag(row.id, row.artifact_sha256, "artifact")
    if etag_matches(if_none_match(request.headers), etag):
        return not_modified(etag)
    # Our ETag replaces FileResponse's mtime/size one (it keeps a header already set), so range
    # requests' If-Range is checked against the same validator.
    return FileResponse(
        service.artifact_path(row),
        media_type="application/gzip",
        filename=f"{row.id}-model.tar.gz",
        headers=cache_headers(etag),
    )


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a model",
    responses=error_responses(404, 409, 422),
)
def delete_model(model_id: str, request: Request, service: ModelServiceDep) -> Response:
    """Refused with 409 while an endpoint serves it."""
    service.delete(model_id)
    # This process drops its cached reads of the model now; others when they see the new generation.
    rendered_cache(request).discard(lambda key: key[0] == model_id)
    app_state(request).catalog.changed()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
