"""What one HTTP connection may cost before, and while, the application reads its request.

uvicorn's default HTTP implementation (httptools) bounds neither the size of a request's headers
nor the time a client may take to send them or the body: a client could send a 128 MiB header
that the parser buffers in full, or hold a connection for ever by sending one byte now and then.
:class:`BoundedHttpToolsProtocol` is that same protocol (the same C parser; the bounds add well under
a microsecond per request) with three bounds, all configurable (see ``service.settings``):

* **header size** (``CENTROID_MAX_HEADER_BYTES``): a request line and headers larger than this get
  ``431`` and the connection is closed. Headers still arriving are counted as they are read, so the
  parser never buffers more than one read (at most 256 KiB) beyond the limit.
* **header time** (``CENTROID_HEADER_TIMEOUT_SECONDS``): a request's headers must be complete this
  long after its first byte (after the connection opened, for the first request); otherwise ``408``
  and the connection is closed (a connection that sent nothing at all is just closed).
* **body time** (``CENTROID_BODY_TIMEOUT_SECONDS`` and ``CENTROID_BODY_MIN_BYTES_PER_SECOND``): once
  the headers are in, the body must be complete within the timeout, extended by one second for
  every ``min_bytes_per_second`` bytes received (Apache's ``mod_reqtimeout`` rule: a large upload at
  a reasonable rate is fine, a trickle is not). Time during which the server is not reading because
  the application has not consumed what it has (flow control), or has not yet asked for a body the
  client holds back until ``100 Continue``, does not count. When it runs out,
  ``408`` (unless a response has started) and the connection is closed; the application sees a
  client disconnect (``service.http_errors`` answers it as 408 in the access log and metrics).

The timers cost one ``call_later`` per connection and none per request whose headers and body
arrive in the same read, which is the common case on the hot paths.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.error_body import error_body
from service.request_context import CLIENT_TIMED_OUT, scope_request_id

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from service.settings import Settings

log = logging.getLogger("centroid.http")
_base = HttpToolsProtocol


@dataclass(frozen=True)
class HttpLimits:
    """The bounds :class:`BoundedHttpToolsProtocol` enforces."""

    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    body_min_bytes_per_second: float

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            header_timeout=settings.header_timeout_seconds,
            body_timeout=settings.body_timeout_seconds,
            body_min_bytes_per_second=float(settings.body_min_bytes_per_second),
        )


def _response(status: int, body: dict[str, Any], default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete ``Connection: close`` response in the API's error shape."""
    content = orjson.dumps(body)
    parts = [STATUS_LINE[status]]
    for name, value in default_headers:
        parts.extend([name, b": ", value, b"\r\n"])
    request_id = body["error"].get("request_id")
    if request_id:
        parts.extend([b"x-request-id: ", str(request_id).encode("latin-1"), b"\r\n"])
    parts.extend(
        [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(content)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            content,
        ]
    )
    return b"".join(parts)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit and header and body timeouts."""

    #: Set by ``centroid serve``; a process that imports the class on its own (``--workers N``)
    #: reads the limits from the environment on its first connection.
    limits: ClassVar[HttpLimits | None] = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        _base.__init__(self, config, server_state, app_state, _loop)
        limits = type(self).limits
        if limits is None:
            from service.settings import get_settings

            limits = BoundedHttpToolsProtocol.limits = HttpLimits.from_settings(get_settings())
        self._limits = limits
        self._header_scope: object = None  # the request whose header bytes are being counted
        self._header_bytes = 0
        self._reading_body = False  # from the end of a request's headers to the end of its body
        self._feeding = 0  # size of the read being parsed
        self._refused = False  # answered and closing: ignore the rest of the read
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_deadline = 0.0

    # Connection events. The overrides call the base class's functions directly (no ``super()``):
    # they run for every request on the hot paths.

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        _base.connection_made(self, transport)
        self._header_timer = self.loop.call_later(self._limits.header_timeout, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        _base.connection_lost(self, exc)

    def data_received(self, data: bytes) -> None:
        self._feeding = len(data)
        _base.data_received(self, data)
        scope = self.scope
        if scope is not None and "method" not in scope:  # _headers_incomplete(), inline: on every read
            if not self.transport.is_closing():
                self._count_header_bytes(len(data))
        elif self._reading_body and not self.transport.is_closing():
            limits = self._limits
            if self._body_timer is None:
                self._body_deadline = self.loop.time() + limits.body_timeout
                self._body_timer = self.loop.call_later(limits.body_timeout, self._body_timeout)
            elif limits.body_min_bytes_per_second > 0:
                self._body_deadline += len(data) / limits.body_min_bytes_per_second

    def _headers_incomplete(self) -> bool:
        """A request has begun (uvicorn made its scope) and its headers have not ended (the scope
        has no method yet)."""
        scope = self.scope
        return scope is not None and "method" not in scope

    def _count_header_bytes(self, size: int) -> None:
        # Every byte of a read in which the headers did not end belongs to them (give or take the
        # tail of a pipelined request's body in the same read): the parser buffers them.
        if self.scope is not self._header_scope:  # a request that began in this read
            self._header_scope = self.scope
            self._header_bytes = 0
        self._header_bytes += size
        if self._header_bytes > self._limits.max_header_bytes:
            self._refuse_headers_too_large()
        elif self._header_timer is None:
            self._header_timer = self.loop.call_later(self._limits.header_timeout, self._header_timeout)

    # Parser callbacks

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._reading_body = True
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        limit = self._limits.max_header_bytes
        # Headers that ended within one read may still be over the limit: measure them then (only
        # then, as the request line and headers cannot be larger than what was read).
        earlier = self._header_bytes if self.scope is self._header_scope else 0
        if earlier + self._feeding > limit:
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > limit:
                self._refuse_headers_too_large()
                return
        _base.on_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            _base.on_body(self, body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._reading_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        _base.on_message_complete(self)

    # The bounds

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client"

    def _close_with(self, status: int, code: str, message: str, details: dict[str, Any], rid: str | None) -> None:
        body = error_body(code, message, details, rid)
        self.transport.write(_response(status, body, self.server_state.default_headers))
        self.transport.close()

    def _refuse_headers_too_large(self) -> None:
        limit = self._limits.max_header_bytes
        log.warning(
            "closing connection from %s: request headers larger than %d bytes (431)",
            self._peer(),
            limit,
            extra={"status": 431, "limit_bytes": limit},
        )
        self._cancel_timers()
        self._reading_body = False
        self._refused = True
        self._close_with(
            431,
            "request_header_fields_too_large",
            f"the request line and headers are larger than the limit of {limit} bytes",
            {"limit_bytes": limit},
            None,
        )

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        timeout = self._limits.header_timeout
        if self.flow.read_paused:  # a pipelined request waiting for the one before it: not the client's fault
            self._header_timer = self.loop.call_later(timeout, self._header_timeout)
            return
        if not self._headers_incomplete():  # a connection that never sent a byte
            log.info("closing connection from %s: no request within %g s", self._peer(), timeout)
            self.transport.close()
            return
        log.warning(
            "closing connection from %s: request headers not complete within %g s (408)",
            self._peer(),
            timeout,
            extra={"status": 408, "timeout_seconds": timeout},
        )
        self._refused = True
        self._close_with(
            408,
            "request_timeout",
            f"the request headers did not arrive within {timeout:g} s",
            {"timeout_seconds": timeout},
            None,
        )

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or not self._reading_body:
            return
        now = self.loop.time()
        timeout = self._limits.body_timeout
        if now < self._body_deadline:  # the body kept arriving at the minimum rate: extended
            self._body_timer = self.loop.call_later(self._body_deadline - now, self._body_timeout)
            return
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # The application is behind (it has not consumed what was read, or not yet asked for a
            # body the client holds back until "100 Continue"), not the client.
            self._body_deadline = now + timeout
            self._body_timer = self.loop.call_later(timeout, self._body_timeout)
            return
        self._reading_body = False
        request_id = scope_request_id(cycle.scope) if cycle is not None else None
        extra: dict[str, Any] = {"status": 408, "timeout_seconds": timeout}
        if request_id:
            extra["request_id"] = request_id
        log.warning(
            "closing connection from %s: request body not complete within its time limit (408)",
            self._peer(),
            extra=extra,
        )
        if cycle is None or cycle.response_started:
            self.transport.close()
            return
        # The application is told the client went away (its reads return a disconnect and
        # its response is dropped); the client gets the 408 instead.
        cycle.scope.setdefault("state", {})[CLIENT_TIMED_OUT] = True
        cycle.disconnected = True
        cycle.message_event.set()
        self._close_with(
            408,
            "request_timeout",
            f"the request body did not arrive within {timeout:g} s "
            f"(extended by 1 second per {self._limits.body_min_bytes_per_second:g} bytes received)",
            {"timeout_seconds": timeout, "min_bytes_per_second": self._limits.body_min_bytes_per_second},
            request_id,
        )
