"""HTTP routes of the datasets API. Validation and HTTP shapes only; the work is in the service."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.orm import Session

from schemas.common import MAX_OFFSET, NOT_CONFIGURED_RESPONSE, LimitQuery, OffsetQuery, Page, error_responses
from schemas.datasets import (
    NAME_SCHEMA,
    Dataset,
    DatasetCreate,
    DatasetDetail,
    DatasetListItem,
    DatasetRows,
    DatasetTask,
    DatasetTaskStatus,
    DeriveRequest,
    Name,
    S3DatasetCreate,
)
from service.datasets.parsing import DELIMITERS
from service.datasets.s3 import require_s3_settings
from service.datasets.service import DatasetService, build_dataset_service
from service.datasets.task_repository import DatasetTaskRepository
from service.db.tables import DatasetTable, DatasetTaskTable
from service.deps import AppState, app_state, db_session
from service.errors import InvalidInput, UnsupportedMediaType
from service.event_streams import EVENTS_RESPONSE, event_stream
from service.jobs.repository import JobRepository
from service.media_types import media_type
from service.models.repository import ModelRepository
from service.request_bodies import parse_json, spool_body, spool_multipart, validate
from service.sweeps.repository import SweepRepository

router = APIRouter(prefix="/datasets", tags=["datasets"])
tasks_router = APIRouter(prefix="/dataset-tasks", tags=["datasets"])


class CSVResponse(StreamingResponse):
    media_type = "text/csv"


class CsvUploadForm(BaseModel):
    """The non-file fields of a CSV upload (another field is a 422: the schema lists them all)."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    key_column: str | None = Field(default=None, max_length=256)
    delimiter: str = Field(default=",")

    @field_validator("key_column")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("delimiter")
    @classmethod
    def _known_delimiter(cls, value: str) -> str:
        if value not in DELIMITERS:
            raise ValueError(f"must be one of {sorted(DELIMITERS)}")
        return value


CSV_FILE_DESCRIPTION = (
    "UTF-8 CSV text with a header row of distinct, non-blank column names (no NUL bytes), every row as wide as "
    "the header; `key_column`, when given, names one of its columns, with a distinct non-empty value in every "
    "row. Content that breaks these rules is answered 400 `invalid_input` naming the row or column."
)
_CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "name"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": CSV_FILE_DESCRIPTION},
                        "name": {**NAME_SCHEMA, "example": "crimes"},
                        "key_column": {"type": "string", "maxLength": 256, "example": "State"},
                        "delimiter": {"type": "string", "enum": sorted(DELIMITERS), "default": ","},
                    },
                },
                "encoding": {"file": {"contentType": "text/csv"}},
            },
            "text/csv": {
                "schema": {"type": "string", "format": "binary", "description": CSV_FILE_DESCRIPTION},
                "example": "State,Crime,Density\nAlabama,4.5,94.4\n",
            },
            "application/json": {"schema": DatasetCreate.model_json_schema()},
        },
    },
    "parameters": [
        {
            "name": "name",
            "in": "query",
            "required": False,
            "description": "With a `text/csv` body only (required then: 422 without it): the dataset's name.",
            "schema": NAME_SCHEMA,
            "example": "crimes",
        },
        {
            "name": "key_column",
            "in": "query",
            "required": False,
            "description": "With a `text/csv` body only: the column whose values label the rows.",
            "schema": {"type": "string", "maxLength": 256},
            "example": "State",
        },
        {
            "name": "delimiter",
            "in": "query",
            "required": False,
            "description": "With a `text/csv` body only: the field delimiter.",
            "schema": {"type": "string", "enum": sorted(DELIMITERS), "default": ","},
        },
        {
            "name": "Prefer",
            "in": "header",
            "required": False,
            "description": "`respond-async` (CSV uploads): answer 202 with a dataset task as soon as the file is "
            "received and checked (its bytes, header and key column), and parse it in the background.",
            "schema": {"type": "string", "example": "respond-async"},
        },
    ],
}

PREFER_DESCRIPTION = (
    "`respond-async`: answer 202 at once with a dataset task (`Location: /dataset-tasks/{id}`) that a worker "
    "runs in the background, with progress; without it the request answers when the dataset is made."
)
_ASYNC_RESPONSE: dict[int | str, dict[str, Any]] = {
    202: {
        "model": DatasetTask,
        "description": "Accepted (with `Prefer: respond-async`): the task that will make the dataset; follow "
        "`Location`. Its errors are the synchronous request's, in the task's `error`.",
        "headers": {
            "Location": {"description": "`/dataset-tasks/{id}`", "schema": {"type": "string"}},
            "Preference-Applied": {"description": "`respond-async`", "schema": {"type": "string"}},
        },
    }
}


def wants_async(prefer: str | None) -> bool:
    """RFC 7240: ``Prefer: respond-async`` (among other preferences, any case)."""
    if not prefer:
        return False
    return any(part.split(";")[0].strip().lower() == "respond-async" for part in prefer.split(","))


def accepted(task: DatasetTaskTable) -> JSONResponse:
    body = task_view(task)
    return JSONResponse(
        body.model_dump(mode="json"),
        status_code=status.HTTP_202_ACCEPTED,
        headers={"Location": f"/dataset-tasks/{task.id}", "Preference-Applied": "respond-async"},
    )


def _used_by_jobs(session: Session, dataset_id: str) -> list[str]:
    return [f"training job {name!r}" for name in JobRepository(session).using_dataset(dataset_id)]


def _used_by_models(session: Session, dataset_id: str) -> list[str]:
    return [f"model {model_id!r}" for model_id in ModelRepository(session).using_dataset(dataset_id)]


def _used_by_sweeps(session: Session, dataset_id: str) -> list[str]:
    return [f"sweep {name!r}" for name in SweepRepository(session).using_dataset(dataset_id)]


def _used_by_tasks(session: Session, dataset_id: str) -> list[str]:
    return [f"dataset task {task_id!r}" for task_id in DatasetTaskRepository(session).active_using(dataset_id)]


def dataset_service(session: Session = Depends(db_session), state: AppState = Depends(app_state)) -> DatasetService:
    checks = (_used_by_jobs, _used_by_sweeps, _used_by_models, _used_by_tasks)
    return build_dataset_service(session, state.settings, state.store, usage_checks=checks)


DatasetServiceDep = Annotated[DatasetService, Depends(dataset_service)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Dataset,
    summary="Create a dataset from a CSV upload or JSON rows",
    responses={**error_responses(400, 413, 415, 422, 503, 507), **_ASYNC_RESPONSE},
    openapi_extra=_CREATE_BODY,
)
async def create_dataset(request: Request, service: DatasetServiceDep) -> Dataset | JSONResponse:
    """Upload a CSV file (multipart: `file`, `name`, optional `key_column`, `delimiter`; or the file
    itself as a `text/csv` body with `name`, `key_column`, `delimiter` in the query) or send
    `{name, key_column, columns, rows}` as JSON. Column types are inferred; numbers written with
    thousands separators or as quoted strings (`"1,210.5"`) are numbers.

    A CSV upload is streamed to disk as it arrives and parsed column-wise from there, so its size is
    bounded by `CENTROID_MAX_CSV_UPLOAD_BYTES` (default 10 GiB) and the free disk (507 at once when
    the disk cannot hold twice the declared size), not by memory. JSON bodies keep the smaller
    `CENTROID_MAX_UPLOAD_BYTES`.

    With `Prefer: respond-async` a CSV upload is answered 202 once the file is received and its
    bytes, header and key column checked; a worker parses it (`GET /dataset-tasks/{id}` shows the
    progress). A JSON body is always answered when the dataset is made."""
    content_type = media_type(request.headers.get("content-type"))
    if content_type == "multipart/form-data":
        return await _create_from_upload(request, service)
    if content_type == "text/csv":
        params = {key: value for key, value in request.query_params.items() if key in CsvUploadForm.model_fields}
        return await _create_from_upload(request, service, validate(CsvUploadForm, params, ("query",)))
    if content_type == "application/json":
        payload = validate(DatasetCreate, _json_document(await request.body()))
        return dataset_view(await run_in_threadpool(service.create_from_rows, payload))
    raise UnsupportedMediaType(
        f"unsupported Content-Type {content_type or '(none)'!r}; send multipart/form-data, text/csv or application/json"
    )


@router.post(
    "/s3",
    status_code=status.HTTP_201_CREATED,
    response_model=Dataset,
    summary="Register data that already lives in S3 as a dataset (nothing is copied)",
    responses={**error_responses(400, 422, 503), 409: NOT_CONFIGURED_RESPONSE},
)
def register_s3_dataset(
    request: S3DatasetCreate, service: DatasetServiceDep, state: AppState = Depends(app_state)
) -> Dataset:
    """List the CSV or Parquet objects under `uri` (`s3://bucket/prefix/`, at most 1000) and read the
    schema, row count and per-column summary from the data: Parquet footers; for CSV the header and
    the types pyarrow infers from the first MiB, then one streaming pass over every object (rows,
    values, summary). Nothing is copied into Centroid: the dataset keeps the objects' keys, sizes and
    row counts (`location`), and reads them where they are.

    A dataset in S3 can be read (`GET /datasets/{id}`, `/rows`, `/csv`), trained on by both backends
    (the local one streams the objects; SageMaker reads them in place when they are headerless
    numeric CSV of exactly the job's features, else the features are converted once per job) and
    deleted (its objects are left alone). Derives, predictions for a `dataset_id` and model
    assignments need Centroid's own Parquet file and are refused with 409.

    AWS access uses the SageMaker backend's settings (`CENTROID_AWS_REGION`, required;
    `CENTROID_AWS_ENDPOINT_URL`; `CENTROID_AWS_MAX_ATTEMPTS`) and the AWS standard credential chain.
    Errors (400, `details.reason`): `no_such_bucket`, `not_found` (nothing under the prefix),
    `no_objects` (only skipped objects), `access_denied`, `too_many`, `mixed_formats`,
    `unknown_format`, `compressed`, `schemas_differ`; a value CSV cannot hold (nan, inf) is a 400
    naming the object, row and column. S3 unreachable: 503."""
    require_s3_settings(state.settings)  # refused before any work, as a 409
    return dataset_view(service.create_from_s3(request))


def _json_document(body: bytes) -> Any:
    try:
        return parse_json(body)
    except ValueError as exc:  # not a JSONDecodeError: an integer of more than 4300 digits, which int() refuses
        raise InvalidInput(
            "the body holds an integer too long to read (more than 4300 digits); no column can hold it",
            details={"reason": str(exc)[:200]},
        ) from exc


async def _create_from_upload(
    request: Request, service: DatasetService, query: CsvUploadForm | None = None
) -> Dataset | JSONResponse:
    """Stream the CSV (a multipart ``file`` part, or the whole ``text/csv`` body) to a temp file in
    the artifact directory, then parse it from there on a worker thread; the temp file is removed
    whatever happens."""
    background = wants_async(request.headers.get("prefer"))
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        service.check_free_space(int(declared))
    spool = await run_in_threadpool(service.new_spool)
    try:
        if query is None:
            upload = await spool_multipart(request, spool, "the CSV file")
            fields = validate(CsvUploadForm, upload.fields)
            filename = upload.filename
        else:
            await spool_body(request, spool)
            fields, filename = query, None
        facts = await run_in_threadpool(spool.close)
        if background:
            task = await run_in_threadpool(
                service.submit_upload,
                fields.name,
                spool.path,
                facts,
                key_column=fields.key_column,
                filename=filename,
                delimiter=fields.delimiter,
            )
            return accepted(task)
        row = await run_in_threadpool(
            service.create_from_csv,
            fields.name,
            spool.path,
            facts,
            key_column=fields.key_column,
            filename=filename,
            delimiter=fields.delimiter,
        )
        return dataset_view(row)
    finally:
        await run_in_threadpool(spool.discard)


@router.get(
    "", response_model=Page[DatasetListItem], summary="List datasets, newest first", responses=error_responses(422)
)
def list_datasets(
    service: DatasetServiceDep,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 50,
    name: Annotated[str | None, Query(max_length=200, description="Only datasets with this name.")] = None,
) -> Page[DatasetListItem]:
    """Items carry `recipe_summary` instead of the recipe (`GET /datasets/{id}` has it)."""
    rows, total = service.page(offset, limit, name)
    return Page[DatasetListItem](
        items=[DatasetListItem.model_validate(r, from_attributes=True) for r in rows],
        total=total,
        offset=offset,
        limit=limit,
    )


@router.get(
    "/{dataset_id}",
    response_model=DatasetDetail,
    summary="A dataset's metadata and per-column summary",
    responses=error_responses(404, 422),
)
def get_dataset(dataset_id: str, service: DatasetServiceDep) -> DatasetDetail:
    row = service.get(dataset_id)
    return DatasetDetail.model_validate(
        {**Dataset.model_validate(row, from_attributes=True).model_dump(), "summary": service.summary(row)}
    )


@router.get(
    "/{dataset_id}/rows",
    response_model=DatasetRows,
    summary="A page of a dataset's rows",
    responses=error_responses(404, 422),
)
def get_rows(
    dataset_id: str,
    service: DatasetServiceDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="First row (0-based).")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most rows to return.")] = 100,
) -> DatasetRows:
    row = service.get(dataset_id)
    return DatasetRows(
        dataset_id=row.id,
        columns=[c["name"] for c in row.columns],
        rows=service.rows(row, offset, limit),
        offset=offset,
        limit=limit,
        total=row.row_count,
    )


@router.get(
    "/{dataset_id}/csv",
    response_class=CSVResponse,
    summary="Download a dataset as CSV",
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}, **error_responses(404, 422)},
)
def download_csv(
    dataset_id: str,
    service: DatasetServiceDep,
    spreadsheet_safe: Annotated[
        bool,
        Query(
            description="Neutralise text cells a spreadsheet would run as a formula (those starting with `=`, `+`, "
            "`-`, `@`, a tab or a carriage return, unless the whole cell is a number) by prefixing a single quote "
            "`'`, as OWASP's CSV-injection guidance advises; header names too. Numeric columns are never changed. "
            "Default: every cell exactly as stored."
        ),
    ] = False,
) -> CSVResponse:
    """Cells come back exactly as stored (text cells as uploaded, numbers as floats or integers); pass
    `spreadsheet_safe=true` for a file meant to be opened in a spreadsheet."""
    row = service.get(dataset_id)
    return CSVResponse(
        service.csv_chunks(row, spreadsheet_safe=spreadsheet_safe),
        headers={"Content-Disposition": f'attachment; filename="{row.id}.csv"'},
    )


@router.post(
    "/{dataset_id}/derive",
    status_code=status.HTTP_201_CREATED,
    response_model=Dataset,
    summary="Derive a new dataset by joining, scaling, selecting, renaming, filling",
    responses={**error_responses(400, 404, 422, 503, 507), **_ASYNC_RESPONSE},
)
def derive_dataset(
    dataset_id: str,
    request: DeriveRequest,
    service: DatasetServiceDep,
    prefer: Annotated[str | None, Header(description=PREFER_DESCRIPTION)] = None,
) -> Dataset | JSONResponse:
    """Apply `steps` in order to dataset `dataset_id`; the result is a new dataset whose recipe
    records every step with its fitted parameters.

    A derive of millions of rows takes seconds to minutes: with `Prefer: respond-async` it runs in
    the background (404 and the recipe's ceilings are still answered at once; a step's refusal
    becomes the task's `error`), and `GET /dataset-tasks/{id}` shows its stage and progress."""
    if wants_async(prefer):
        return accepted(service.submit_derive(dataset_id, request))
    return dataset_view(service.derive(dataset_id, request))


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a dataset",
    responses=error_responses(404, 409, 422),
)
def delete_dataset(dataset_id: str, service: DatasetServiceDep) -> Response:
    """Refused with 409 while a training job or model still uses it."""
    service.delete(dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def dataset_view(row: DatasetTable) -> Dataset:
    return Dataset.model_validate(row, from_attributes=True)


def task_view(task: DatasetTaskTable) -> DatasetTask:
    done = task.status == DatasetTaskStatus.COMPLETED
    return DatasetTask.model_validate(
        {
            "id": task.id,
            "kind": task.kind,
            "name": task.name,
            "status": task.status,
            "parent_id": task.parent_id,
            "progress": task.progress,
            "dataset_id": task.dataset_id if done else None,
            "error": task.error,
            "attempts": task.attempts,
            "created_at": task.created_at,
            "started_at": task.started_at,
            "ended_at": task.ended_at,
        }
    )


def task_repository(session: Session = Depends(db_session)) -> DatasetTaskRepository:
    return DatasetTaskRepository(session)


DatasetTaskRepositoryDep = Annotated[DatasetTaskRepository, Depends(task_repository)]


@tasks_router.get(
    "",
    response_model=Page[DatasetTask],
    summary="List background uploads and derives, newest first",
    responses=error_responses(422),
)
def list_tasks(
    tasks: DatasetTaskRepositoryDep,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 50,
    status_filter: Annotated[
        DatasetTaskStatus | None, Query(alias="status", description="Only tasks with this status.")
    ] = None,
) -> Page[DatasetTask]:
    rows, total = tasks.page(offset, limit, status_filter)
    return Page[DatasetTask](items=[task_view(r) for r in rows], total=total, offset=offset, limit=limit)


@tasks_router.get(
    "/{task_id}",
    response_model=DatasetTask,
    summary="A background upload or derive: status, progress, result",
    responses=error_responses(404, 422),
)
def get_task(task_id: str, tasks: DatasetTaskRepositoryDep) -> DatasetTask:
    """Poll until `status` is `Completed` (then `dataset_id` names the new dataset) or `Failed`
    (`error` holds what the synchronous request would have answered)."""
    return task_view(tasks.get(task_id))


@tasks_router.get(
    "/{task_id}/events",
    response_class=StreamingResponse,
    summary="Follow a background upload or derive: its status and progress pushed as Server-Sent Events",
    responses={**EVENTS_RESPONSE, **error_responses(404, 422, 503)},
)
def task_events(task_id: str, state: Annotated[AppState, Depends(app_state)]) -> StreamingResponse:
    """`event: progress` with the task's description (as `GET /dataset-tasks/{task_id}`) at once
    and whenever its status or progress changes; `event: end` with the final state (`Completed`
    with its `dataset_id`, or `Failed` with its `error`), then the stream closes. 503 when the
    server already holds `CENTROID_MAX_EVENT_STREAMS` streams."""
    final = (DatasetTaskStatus.COMPLETED, DatasetTaskStatus.FAILED)

    def read() -> tuple[DatasetTask, bool]:
        with state.database.session() as session:
            task = DatasetTaskRepository(session).get(task_id)
            return task_view(task), task.status in final

    settings = state.settings
    return event_stream(
        read, state.event_streams, poll_seconds=settings.event_poll_seconds, max_seconds=settings.event_stream_seconds
    )
