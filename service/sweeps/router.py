"""HTTP routes of sweeps."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from schemas.common import NOT_CONFIGURED_RESPONSE, LimitQuery, OffsetQuery, Page, error_responses
from schemas.models import Model
from schemas.sweeps import SweepCreate, SweepModelCreate, SweepView
from service.deps import AppState, app_state, db_session
from service.event_streams import EVENTS_RESPONSE, event_stream
from service.statuses import JobStatus
from service.sweeps.repository import SweepRepository
from service.sweeps.service import SweepService, sweep_view

router = APIRouter(prefix="/sweeps", tags=["sweeps"])


def sweep_service(session: Session = Depends(db_session), state: AppState = Depends(app_state)) -> SweepService:
    return SweepService(session, state.store, state.backends, state.settings)


SweepServiceDep = Annotated[SweepService, Depends(sweep_service)]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SweepView,
    summary="Start a sweep: every k of a range from one pass",
    responses={**error_responses(400, 404, 422), 409: NOT_CONFIGURED_RESPONSE},
)
def create_sweep(request: SweepCreate, service: SweepServiceDep) -> SweepView:
    """Queue a sweep (status `Pending`); a worker trains every k with one streaming pass over the
    training data and one evaluation pass, then reports per k: msd and ssd (on the test dataset when
    given, else the training data), silhouette, Davies–Bouldin and Calinski–Harabasz (on a seeded
    sample of `sample_size` rows), cluster sizes, and a recommended k with its reasons. Feature
    columns and hyperparameters follow a training job's rules (400 naming the problem); the
    service's ceilings apply at the largest k. The name is the sweep's identity: reusing it is 409.

    With `backend: sagemaker` each k is one SageMaker training job (at most
    `CENTROID_SWEEP_PARALLEL_TRAINING_JOBS` at once), each billed by SageMaker; the worker then
    evaluates every k here in one pass, so the results have the same shape. `training_jobs` shows
    each job and `billable_seconds` their sum."""
    return sweep_view(service.create(request))


@router.get("", response_model=Page[SweepView], summary="List sweeps, newest first", responses=error_responses(422))
def list_sweeps(
    service: SweepServiceDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status", description="Only sweeps in this status.")] = None,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 50,
) -> Page[SweepView]:
    rows, total = service.page(offset, limit, status_filter)
    return Page[SweepView](items=[sweep_view(r) for r in rows], total=total, offset=offset, limit=limit)


@router.get("/{name}", response_model=SweepView, summary="Describe a sweep", responses=error_responses(404, 422))
def get_sweep(name: str, service: SweepServiceDep) -> SweepView:
    """Progress (`rows_processed` of `rows_total`) while it runs; the results per k and the
    recommendation once `Completed`."""
    return sweep_view(service.get(name))


@router.get(
    "/{name}/events",
    response_class=StreamingResponse,
    summary="Follow a sweep: its status and progress pushed as Server-Sent Events",
    responses={**EVENTS_RESPONSE, **error_responses(404, 422, 503)},
)
def sweep_events(name: str, state: Annotated[AppState, Depends(app_state)]) -> StreamingResponse:
    """`event: progress` with the sweep's description (as `GET /sweeps/{name}`) at once and
    whenever it changes (status, rows processed, each SageMaker training job); `event: end` with
    the final state (results and recommendation once `Completed`), then the stream closes. 503
    when the server already holds `CENTROID_MAX_EVENT_STREAMS` streams."""

    def read() -> tuple[SweepView, bool]:
        with state.database.session() as session:
            row = SweepRepository(session).get(name)
            return sweep_view(row), JobStatus(row.status).terminal

    settings = state.settings
    return event_stream(
        read, state.event_streams, poll_seconds=settings.event_poll_seconds, max_seconds=settings.event_stream_seconds
    )


@router.post("/{name}/stop", response_model=SweepView, summary="Stop a sweep", responses=error_responses(404, 409, 422))
def stop_sweep(name: str, service: SweepServiceDep) -> SweepView:
    """A Pending sweep stops at once; a running one becomes `Stopping` and stops within about a
    second. 409 if it already ended."""
    return sweep_view(service.stop(name))


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a finished sweep",
    responses=error_responses(404, 409, 422),
)
def delete_sweep(name: str, service: SweepServiceDep) -> Response:
    """Only a `Completed`, `Failed` or `Stopped` sweep (409 otherwise). Models registered from it stay."""
    service.delete(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{name}/models",
    status_code=status.HTTP_201_CREATED,
    response_model=Model,
    summary="Register one k of a sweep as a model",
    responses=error_responses(400, 404, 409, 422),
)
def register_sweep_model(name: str, request: SweepModelCreate, service: SweepServiceDep) -> Model:
    """The recommended k by default, or any `k` the sweep trained: a normal model (`source:
    sweep`), with the training dataset's recipe, deployable like any other. 409 while the sweep is
    not `Completed`, or when that k was registered already (naming its model); 400 for a k the
    sweep did not train."""
    return Model.model_validate(service.register_model(name, request), from_attributes=True)
