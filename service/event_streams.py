"""Progress pushed as Server-Sent Events: ``GET /training-jobs/{name}/events`` and
``GET /sweeps/{name}/events``.

A stream sends the resource's description (the same JSON body as its ``GET``) as an
``event: progress`` message at once and again whenever it changes, then a last ``event: end``
message with the final state when the resource reaches one, and closes. Changes are noticed by
re-reading the one row every ``CENTROID_EVENT_POLL_SECONDS`` (a primary-key read off the event
loop; nothing is sent while nothing changed), and a ``: keep-alive`` comment goes out every 15 s
of silence so proxies keep the connection open.

Bounds: at most ``CENTROID_MAX_EVENT_STREAMS`` streams per process (another is a 503 with
Retry-After), and a stream ends after ``CENTROID_EVENT_STREAM_SECONDS`` with ``event: timeout``
(data: the last state); a browser's ``EventSource`` then reconnects on its own. A resource deleted
while followed ends the stream with ``event: gone``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from service.errors import NotFound, ServiceUnavailable

KEEP_ALIVE_SECONDS = 15.0
MEDIA_TYPE = "text/event-stream"

#: OpenAPI description of an events route's 200 answer.
EVENTS_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A Server-Sent Events stream (`text/event-stream`): `event: progress` messages whose `data` is "
        "the resource's JSON description (as its GET answers), at once and on every change; then `event: end` with "
        "the final state, and the stream closes. `event: timeout` ends a stream that outlived "
        "`CENTROID_EVENT_STREAM_SECONDS` (reconnect to go on); `event: gone` a resource deleted meanwhile. Lines "
        "starting with `:` are keep-alive comments.",
        "content": {
            MEDIA_TYPE: {
                # Open API 3.1: for an event stream, `schema` describes each event.
                "schema": {
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string", "enum": ["progress", "end", "timeout", "gone"]},
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "description": "One line of JSON: the resource's description (for `gone`: "
                            '`{"message": ...}`).',
                        },
                    },
                },
                "example": 'event: progress\ndata: {"name": "crime-k10", "status": "InProgress", ...}\n\n'
                'event: end\ndata: {"name": "crime-k10", "status": "Completed", ...}\n\n',
            }
        },
    }
}


class StreamSlots:
    """How many event streams this process may hold open at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.open >= self.limit:
                raise ServiceUnavailable(
                    f"this server already follows {self.limit} event streams (CENTROID_MAX_EVENT_STREAMS); retry "
                    "later, or poll the resource's GET",
                    details={"limit": self.limit},
                )
            self.open += 1

    def give_back(self) -> None:
        with self._lock:
            self.open -= 1


def message(event: str, data: str) -> bytes:
    """One SSE message (``data`` is one line of JSON: no newline inside)."""
    return f"event: {event}\ndata: {data}\n\n".encode()


def event_stream(
    read: Callable[[], tuple[BaseModel, bool]],
    slots: StreamSlots,
    *,
    poll_seconds: float,
    max_seconds: float,
) -> StreamingResponse:
    """Follow a resource: ``read()`` returns its description and whether that state is final, and
    raises :class:`NotFound` once it is gone. The first read happens here, so an unknown name is
    the usual 404 (not a stream); it, and every later one, runs in a worker thread."""
    first, final = read()
    slots.take()

    async def messages() -> AsyncIterator[bytes]:
        body = first.model_dump_json()
        if final:
            yield message("end", body)
            return
        yield message("progress", body)
        started = last_sent = time.monotonic()
        while True:
            await anyio.sleep(poll_seconds)
            try:
                view, done = await anyio.to_thread.run_sync(read)
            except NotFound as exc:
                yield message("gone", json.dumps({"message": exc.message}))
                return
            current = view.model_dump_json()
            now = time.monotonic()
            if done:
                yield message("end", current)
                return
            if current != body:
                body, last_sent = current, now
                yield message("progress", current)
            elif now - last_sent >= KEEP_ALIVE_SECONDS:
                last_sent = now
                yield b": keep-alive\n\n"
            if now - started >= max_seconds:
                yield message("timeout", current)
                return

    return _SlotResponse(
        slots,
        messages(),
        media_type=MEDIA_TYPE,
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},  # no proxy buffering (nginx)
    )


class _SlotResponse(StreamingResponse):
    """A stream that gives its slot back however it ends: completed, client gone, or cancelled."""

    def __init__(self, slots: StreamSlots, content: AsyncIterator[bytes], **options: Any) -> None:
        super().__init__(content, **options)
        self._slots = slots

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slots.give_back()
