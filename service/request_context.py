"""The id of the request being served, visible to logs and error bodies."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

_request_id: ContextVar[str | None] = ContextVar("centroid_request_id", default=None)

#: Key in the ASGI scope's ``state`` under which the edge middleware records the request id.
REQUEST_ID_STATE = "request_id"
#: Key in the ASGI scope's ``state`` set (True) when the server cut the request because the client
#: did not send its body in time (``service.http_limits``): the disconnect the application then sees
#: is answered as 408, not 499.
CLIENT_TIMED_OUT = "client_timed_out"


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(value: str | None) -> object:
    """Set the id for the current context; returns a token for :func:`reset_request_id`."""
    return _request_id.set(value)


def reset_request_id(token: object) -> None:
    _request_id.reset(token)  # type: ignore[arg-type]


def scope_request_id(scope: Mapping[str, Any]) -> str | None:
    """The request id recorded in an ASGI scope, for code that runs outside the middleware that
    sets the context variable (the last-resort error handler, the HTTP protocol's timers)."""
    state = scope.get("state")
    value = state.get(REQUEST_ID_STATE) if isinstance(state, Mapping) else None
    return value if isinstance(value, str) else None
