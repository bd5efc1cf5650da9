"""The fast lane: the hot paths answered in plain ASGI, before FastAPI's router.

Other services call ``/invocations``, ``/predictions`` (rows), ``/models/{id}/assignments`` and
``/healthz`` on every request they serve. For a one-row request, FastAPI's routing, dependency
solving and response machinery cost more than the prediction itself (route matching alone walks
every registered route). So :class:`FastLane`, placed inside :class:`~service.middleware.EdgeMiddleware`
(request id, API key, body limits, access log and metrics all still apply), recognises these
requests by method and path and answers the common case itself:

* ``GET /healthz``: a pre-rendered body;
* ``POST /endpoints/{name}/invocations`` and ``/predictions`` with a small body for an endpoint
  the serving catalog knows: parsed, predicted and rendered by the same
  :class:`~service.endpoints.serving.ServingService` the FastAPI routes use;
* ``GET /models/{id}/assignments`` already rendered in the immutable-read cache.

Everything else — an endpoint the catalog does not know yet, a large body (which must not block
the event loop), a dataset prediction, an assignments cache miss, any other path — goes on to
FastAPI unchanged (a body already read is handed on as it was received). The FastAPI routes stay
the documented contract (OpenAPI) and the reference behaviour; errors raised here are answered by
the same handler (:func:`service.http_errors.handle_error`) as everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.deps import AppState
from service.endpoints.invocations import JSON, request_format, response_format
from service.endpoints.router import INLINE_BODY_BYTES, parse_prediction_request
from service.errors import UnsupportedMediaType
from service.health import ALIVE_BODY
from service.http_cache import etag_matches, if_none_match, not_modified
from service.http_errors import handle_error
from service.media_types import media_type
from service.models.router import assignments_query

_HEALTHZ = "/healthz"


@dataclass(frozen=True)
class RouteLabel:
    """The route template of a request the lane answered (read by the access metrics)."""

    path: str


class _BodyTooLargeForLane(Exception):
    """The body outgrew what the lane answers inline; FastAPI takes the request."""


class FastLane:
    """Answer the hot paths' common case; hand everything else to ``app`` (FastAPI)."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        # What the metrics label requests with (``scope["route"].path``), as FastAPI's routes would.
        self._route = {
            "invocations": RouteLabel("/endpoints/{name}/invocations"),
            "predictions": RouteLabel("/endpoints/{name}/predictions"),
            "assignments": RouteLabel("/models/{model_id}/assignments"),
            "healthz": RouteLabel(_HEALTHZ),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "GET" and path == _HEALTHZ:
                scope["route"] = self._route["healthz"]
                await send_bytes(send, 200, ALIVE_BODY, JSON)
                return
            parts = path.split("/")
            if len(parts) == 4 and parts[0] == "" and parts[2]:
                if method == "POST" and parts[1] == "endpoints" and parts[3] in ("invocations", "predictions"):
                    await self._endpoint(parts[3], parts[2], scope, receive, send)
                    return
                if method == "GET" and parts[1] == "models" and parts[3] == "assignments":
                    await self._assignments(parts[2], scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _endpoint(self, kind: str, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        serving = self.state.serving
        if serving.catalog.lookup(name) is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self._route[kind]
        request = Request(scope)
        try:
            if kind == "invocations":
                request_kind = request_format(request.headers.get("content-type"))
                response_kind = response_format(request.headers.get("accept"))
            else:
                content_type = media_type(request.headers.get("content-type"))
                if content_type not in ("", JSON) and not content_type.endswith("+json"):
                    raise UnsupportedMediaType(f"unsupported Content-Type {content_type!r}; send {JSON}")
            try:
                body = await _read_small_body(receive)
            except _BodyTooLargeForLane as large:
                chunks, final = large.args
                await self.app(scope, _replay(chunks, receive, complete=False, final=final), send)
                return
            if kind == "invocations":
                content = serving.invoke(name, body, request_kind, response_kind)
                await send_bytes(send, 200, content, response_kind)
                return
            payload = parse_prediction_request(body, self.state.settings.max_invocation_rows)
            if payload.rows is None or payload.dataset_id is not None:
                await self.app(scope, _replay([body], receive, complete=True), send)
                return
            await send_bytes(send, 200, serving.predict_rows(name, payload), JSON)
        except Exception as exc:  # noqa: BLE001 - every error leaves through the one handler
            response = await handle_error(request, exc)
            await response(scope, receive, send)

    async def _assignments(self, model_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        generation = self.state.catalog.generation
        if generation < 0:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            cluster, dataset_id = assignments_query(request)
        except Exception:  # noqa: BLE001 - invalid parameters: FastAPI's route gives the 422
            await self.app(scope, receive, send)
            return
        rendered = self.state.rendered_reads.get((model_id, dataset_id, cluster), generation)
        if rendered is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self._route["assignments"]
        response: Response = (
            not_modified(rendered.etag)
            if etag_matches(if_none_match(request.headers), rendered.etag)
            else rendered.response()
        )
        await response(scope, receive, send)


async def send_bytes(send: Send, status: int, body: bytes, content_type: str) -> None:
    """A complete response in two messages (what Starlette's Response sends, without its object)."""
    if content_type.startswith("text/"):
        content_type += "; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-length", str(len(body)).encode()),
                (b"content-type", content_type.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_small_body(receive: Receive) -> bytes:
    """The whole body, or :class:`_BodyTooLargeForLane` carrying the chunks read so far."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # a disconnect: let the framework deal with it
            raise _BodyTooLargeForLane(chunks, message)
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            break
        if size > INLINE_BODY_BYTES:
            raise _BodyTooLargeForLane(chunks, None)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def _replay(chunks: list[bytes], receive: Receive, *, complete: bool, final: Message | None = None) -> Receive:
    """``receive`` that first hands on what was already read, then the message that ended the
    reading (a disconnect), then continues with the client."""
    pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": not complete}]
    if final is not None:
        pending.append(final)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
