"""The endpoint driver: claim an endpoint that is changing (Creating, Updating, Deleting), ask its
backend to move it on, write the outcome and release it (``next_poll_at`` set while the change
is still under way, so a restarted worker simply picks it up again)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from service.backends.base import EndpointSpec, EndpointUpdate
from service.db.changes import bump_serving
from service.db.tables import EndpointTable
from service.db.types import utcnow
from service.endpoints.repository import EndpointRepository
from service.models.repository import ModelRepository
from service.models.service import served_model
from service.state import CoreState
from service.statuses import EndpointStatus

log = logging.getLogger("centroid.worker")


class EndpointDriver:
    def __init__(self, state: CoreState, worker_id: str, backend_names: Callable[[], list[str]]) -> None:
        self.state = state
        self.settings = state.settings
        self.db = state.database
        self.worker_id = worker_id
        self._backend_names = backend_names

    def step(self) -> bool:
        """Move at most one endpoint on; True if there was one."""
        with self.db.session() as session:
            endpoint = EndpointRepository(session).claim_next(
                self.worker_id, self.settings.lease_seconds, self._backend_names()
            )
            if endpoint is None:
                return False
            model = ModelRepository(session).get(endpoint.pending_model_id or endpoint.model_id)
            spec = EndpointSpec(
                endpoint.name, served_model(model, self.state.store), endpoint.instance_config, endpoint.remote
            )
        backend = self.state.backends.get(endpoint.backend)
        try:
            if endpoint.status == EndpointStatus.DELETING:
                result = backend.delete_endpoint(spec)
            else:
                result = backend.advance_endpoint(spec)
        except Exception as exc:  # noqa: BLE001 - a backend failure must never kill the worker
            log.exception("endpoint %s raised", endpoint.name)
            result = EndpointUpdate(
                EndpointStatus(endpoint.status),
                failure_reason=f"{type(exc).__name__}: {exc}",
                poll_after_seconds=self.settings.remote_poll_seconds,
            )
        self._write(endpoint, spec, result)
        return True

    def _write(self, endpoint: EndpointTable, spec: EndpointSpec, result: EndpointUpdate) -> None:
        with self.db.session() as session:
            repository = EndpointRepository(session)
            if result.gone:
                repository.delete_owned(endpoint.name, self.worker_id)
                bump_serving(session)
                session.commit()
                self.state.catalog.changed()
                log.info("endpoint deleted", extra={"endpoint": endpoint.name})
                return
            values = endpoint_values(endpoint, spec, result)
            if result.status == endpoint.status and EndpointStatus(result.status).busy:
                poll_after = result.poll_after_seconds or self.settings.remote_poll_seconds
                values["next_poll_at"] = utcnow() + timedelta(seconds=poll_after)
            if repository.guarded_update(endpoint.name, self.worker_id, values):
                bump_serving(session)
            session.commit()
        self.state.catalog.changed()
        log.info("endpoint updated", extra={"endpoint": endpoint.name, "status": values.get("status")})


def endpoint_values(endpoint: EndpointTable, spec: EndpointSpec, result: EndpointUpdate) -> dict[str, Any]:
    """The row's new values; a failed switch to another model leaves the old one serving."""
    values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
    if result.remote:
        values["remote"] = {**endpoint.remote, **result.remote}
    if result.status == EndpointStatus.IN_SERVICE:
        values.update(
            status=EndpointStatus.IN_SERVICE, model_id=spec.model.model_id, pending_model_id=None, failure_reason=None
        )
    elif result.status == EndpointStatus.FAILED and endpoint.status == EndpointStatus.UPDATING:
        values.update(
            status=EndpointStatus.IN_SERVICE,
            pending_model_id=None,
            failure_reason=f"switch to model {spec.model.model_id} failed: {result.failure_reason}",
        )
    elif result.status == EndpointStatus.FAILED:
        values.update(status=EndpointStatus.FAILED, failure_reason=result.failure_reason)
    else:
        values.update(status=endpoint.status, failure_reason=result.failure_reason)
    return values
