"""Logging: one JSON object per line (with the request id when there is one) for machines, or
readable text lines for a person at a terminal; ``auto`` picks by whether stderr is a terminal."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from service.request_context import current_request_id

_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Render records as JSON; ``extra={...}`` fields become top-level keys.

    It formats every access log line, so it is kept cheap: orjson, and the timestamp's date and
    time rendered once per second.
    """

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._stamp}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = current_request_id()
        if request_id:
            payload["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key[0] != "_":
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(payload, default=str).decode()
        except TypeError:  # e.g. a str subclass or a key orjson refuses: the standard library copes
            return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    """Readable lines: time, level, logger and message, then the request id and the record's
    ``extra={...}`` fields as ``key=value``, and a traceback on the lines below."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        extras = [
            f"{key}={value}" for key, value in record.__dict__.items() if key not in _STANDARD_ATTRS and key[0] != "_"
        ]
        request_id = current_request_id()
        if request_id:
            extras.insert(0, f"request_id={request_id}")
        cached, record.exc_text = record.exc_text, None
        line = super().format(record)
        record.exc_text = cached
        if not extras:
            return line
        head, newline, tail = line.partition("\n")
        return f"{head}  {' '.join(extras)}{newline}{tail}"


def resolve_format(fmt: str, stream: Any = None) -> str:
    """``json`` or ``text``: ``auto`` is text when ``stream`` (stderr) is a terminal, else JSON."""
    if fmt != "auto":
        return fmt
    stream = sys.stderr if stream is None else stream
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "json"


def configure_logging(level: str, fmt: str) -> None:
    """Install one stderr handler on the root logger (idempotent); ``fmt`` is ``json``, ``text``
    or ``auto`` (see :func:`resolve_format`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if resolve_format(fmt, sys.stderr) == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_centroid", False):
            root.removeHandler(existing)
    handler._centroid = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # Library warnings (numpy, pandas, pyarrow) become log records, JSON lines with the request id.
    logging.captureWarnings(True)


ACCESS_LOGGER = "centroid.access"


class AccessLog:
    """The access log line of every request, written cheaply.

    When the only handler is Centroid's own JSON handler (the configured default), the line is
    rendered with orjson and written straight to its stream under the handler's lock: the same
    JSON object a ``logging`` record would give, without building a record per request (which
    costs more than most requests' own work on the hot paths). Any other set-up — text format,
    extra handlers or filters, a level above INFO — goes through ``logging`` as usual.
    """

    def __init__(self) -> None:
        self.logger = logging.getLogger(ACCESS_LOGGER)

    def _direct_handler(self) -> logging.StreamHandler[Any] | None:
        root = logging.getLogger()
        handlers = root.handlers
        if len(handlers) != 1 or self.logger.handlers or self.logger.filters or root.filters:
            return None
        handler = handlers[0]
        if not getattr(handler, "_centroid", False) or handler.filters:
            return None
        if not isinstance(handler.formatter, JsonFormatter):
            return None
        return handler  # type: ignore[return-value]

    def write(self, method: str, path: str, status: int, seconds: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        duration_ms = round(seconds * 1000, 2)
        handler = self._direct_handler()
        if handler is None or handler.level > logging.INFO:
            record = logging.LogRecord(
                ACCESS_LOGGER, logging.INFO, __file__, 0, "%s %s %s", (method, path, status), None
            )
            record.method, record.path, record.status, record.duration_ms = method, path, status, duration_ms
            self.logger.handle(record)
            return
        formatter: JsonFormatter = handler.formatter  # type: ignore[assignment]
        payload: dict[str, Any] = {
            "ts": formatter._timestamp(time.time()),
            "level": "INFO",
            "logger": ACCESS_LOGGER,
            "msg": f"{method} {path} {status}",
        }
        request_id = current_request_id()
        if request_id:
            payload["request_id"] = request_id
        payload.update(method=method, path=path, status=status, duration_ms=duration_ms)
        line = orjson.dumps(payload).decode() + handler.terminator
        with handler.lock:  # type: ignore[union-attr]
            try:
                handler.stream.write(line)
                handler.flush()
            except Exception:  # noqa: BLE001 - logging must never fail a request
                handler.handleError(logging.makeLogRecord({"msg": line}))
