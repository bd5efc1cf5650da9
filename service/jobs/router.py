"""HTTP routes of training jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from schemas.common import NOT_CONFIGURED_RESPONSE, LimitQuery, OffsetQuery, Page, error_responses
from schemas.jobs import JobStatus, TrainingJob, TrainingJobCreate
from service.deps import AppState, app_state, db_session
from service.event_streams import EVENTS_RESPONSE, event_stream
from service.jobs.repository import JobRepository
from service.jobs.service import JobService, job_view

router = APIRouter(prefix="/training-jobs", tags=["training jobs"])


def job_service(session: Session = Depends(db_session), state: AppState = Depends(app_state)) -> JobService:
    return JobService(session, state.store, state.backends, state.settings)


JobServiceDep = Annotated[JobService, Depends(job_service)]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TrainingJob,
    summary="Start a training job",
    responses={**error_responses(400, 404, 422, 503), 409: NOT_CONFIGURED_RESPONSE},
)
def create_job(request: TrainingJobCreate, service: JobServiceDep) -> TrainingJob:
    """Queue a k-means training job (status `Pending`); a worker picks it up. The name is the
    job's identity, as in SageMaker: reusing it is a 409."""
    return job_view(service.create(request))


@router.get(
    "", response_model=Page[TrainingJob], summary="List training jobs, newest first", responses=error_responses(422)
)
def list_jobs(
    service: JobServiceDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status", description="Only jobs in this status.")] = None,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 50,
) -> Page[TrainingJob]:
    rows, total = service.page(offset, limit, status_filter)
    return Page[TrainingJob](items=[job_view(r) for r in rows], total=total, offset=offset, limit=limit)


@router.get(
    "/{name}", response_model=TrainingJob, summary="Describe a training job", responses=error_responses(404, 422)
)
def get_job(name: str, service: JobServiceDep) -> TrainingJob:
    return job_view(service.get(name))


@router.get(
    "/{name}/events",
    response_class=StreamingResponse,
    summary="Follow a training job: its status and progress pushed as Server-Sent Events",
    responses={**EVENTS_RESPONSE, **error_responses(404, 422, 503)},
)
def job_events(name: str, state: Annotated[AppState, Depends(app_state)]) -> StreamingResponse:
    """`event: progress` with the job's description (as `GET /training-jobs/{name}`) at once and
    whenever its status, secondary status or progress changes; `event: end` with the final state
    (`Completed` with its `model_id`, `Failed`, `Stopped`), then the stream closes. A job already
    ended answers with its `end` message only. 503 when the server already holds
    `CENTROID_MAX_EVENT_STREAMS` streams."""

    def read() -> tuple[TrainingJob, bool]:
        with state.database.session() as session:
            row = JobRepository(session).get(name)
            return job_view(row), JobStatus(row.status).terminal

    settings = state.settings
    return event_stream(
        read, state.event_streams, poll_seconds=settings.event_poll_seconds, max_seconds=settings.event_stream_seconds
    )


@router.post(
    "/{name}/stop",
    response_model=TrainingJob,
    summary="Stop a training job",
    responses=error_responses(404, 409, 422),
)
def stop_job(name: str, service: JobServiceDep) -> TrainingJob:
    """A Pending job stops at once; a running one becomes `Stopping` and stops within about a
    second (SageMaker jobs: StopTrainingJob). 409 if it already ended."""
    return job_view(service.stop(name))


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a finished training job",
    responses=error_responses(404, 409, 422),
)
def delete_job(name: str, service: JobServiceDep) -> Response:
    """Only a `Completed`, `Failed` or `Stopped` job; 409 while it is `Pending`, `InProgress` or
    `Stopping` (stop it first). The model it trained stays (its `training_job_name` becomes null).
    Afterwards the job no longer keeps its datasets from being deleted."""
    service.delete(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
