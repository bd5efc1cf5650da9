"""Bodies the routers read themselves (multipart uploads, JSON checked before it is parsed).

Most routes let FastAPI parse their body. A few read it by hand — to accept either multipart or
JSON, or to refuse an oversized request before building it — and these helpers give them the
same errors FastAPI's own parsing would: 422 for a body that is not the documented JSON, 400 for
one that cannot even be decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.errors import InvalidInput, RequestValidationFailed

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class UploadedFile:
    data: bytes
    filename: str | None


def validate(model: type[M], document: Any, location: tuple[str, ...] = ()) -> M:
    """``model`` built from ``document``, or a 422 listing every problem."""
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        details = [{"loc": [*location, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise RequestValidationFailed("the request does not match the API schema", details=details) from exc


def parse_json(body: bytes) -> Any:
    """orjson for speed; anything it refuses is parsed again by the standard library, whose
    answers (NaN literals, huge integers, the exact error position) the API has always given."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestValidationFailed(f"the body is not valid JSON: {exc.msg} at position {exc.pos}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the body is not UTF-8 (invalid byte at offset {exc.start})") from exc
    except RecursionError as exc:
        raise InvalidInput("the JSON body is nested too deeply") from exc
    except ValueError as exc:  # an integer of more than 4300 digits, which int() refuses to read
        raise InvalidInput(f"the JSON body holds a number that cannot be read: {str(exc)[:120]}") from exc


async def read_upload(request: Request, form: type[M], what: str) -> tuple[UploadedFile, M]:
    """The multipart ``file`` field and the other fields validated as ``form``."""
    async with request.form(max_files=1, max_fields=10) as fields:
        upload = fields.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestValidationFailed(f"multipart field `file` ({what}) is required")
        values = validate(form, {key: value for key, value in fields.items() if isinstance(value, str)})
        return UploadedFile(await upload.read(), upload.filename), values


# --- uploads streamed to disk --------------------------------------------------------------------


class ChunkSink(Protocol):
    """Where a streamed file goes (a :class:`service.datasets.ingest.CsvSpool`)."""

    def write(self, chunk: bytes) -> None: ...


MAX_FIELD_BYTES = 64 * 1024
_FLUSH_BYTES = 1 << 20  # file bytes are handed to the sink (on a worker thread) in pieces this big


class _SinkWriter:
    """Buffers file bytes and writes them to the sink off the event loop, a megabyte at a time.

    One write is in flight while the next megabyte is received: the disk write and the checks the
    sink makes overlap the network (their order is kept: a write starts when the previous ended).
    Every exit path waits for the write in flight before the sink is closed."""

    def __init__(self, sink: ChunkSink) -> None:
        self.sink = sink
        self.buffer = bytearray()
        self.bytes = 0
        self._pending: asyncio.Future[None] | None = None

    def add(self, data: bytes | memoryview) -> None:
        self.buffer += data
        self.bytes += len(data)

    async def flush(self, force: bool = False) -> None:
        if self.buffer and (force or len(self.buffer) >= _FLUSH_BYTES):
            chunk, self.buffer = bytes(self.buffer), bytearray()
            await self.drain()
            self._pending = asyncio.ensure_future(run_in_threadpool(self.sink.write, chunk))
        if force:
            await self.drain()

    async def drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def abandon(self) -> None:
        """After a failure: wait for the write in flight, ignoring its own failure (the first wins)."""
        with contextlib.suppress(Exception):
            await self.drain()


async def spool_body(request: Request, sink: ChunkSink) -> int:
    """A raw request body streamed into ``sink``; returns its size."""
    writer = _SinkWriter(sink)
    try:
        async for chunk in request.stream():
            writer.add(chunk)
            await writer.flush()
        await writer.flush(force=True)
    except BaseException:
        await writer.abandon()
        raise
    return writer.bytes


@dataclass
class StreamedUpload:
    filename: str | None
    fields: dict[str, str]
    file_bytes: int


async def spool_multipart(request: Request, sink: ChunkSink, what: str, max_fields: int = 10) -> StreamedUpload:
    """A ``multipart/form-data`` body whose ``file`` part is streamed into ``sink``.

    The other parts are small text fields (at most :data:`MAX_FIELD_BYTES` each, ``max_fields`` of
    them); a second file, or a field too large, is refused. The body is parsed as it arrives with
    ``python-multipart`` (the parser Starlette uses), so it is never held whole in memory.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidInput("the multipart body has no boundary in its Content-Type")
    writer = _SinkWriter(sink)
    fields: dict[str, str] = {}
    state: dict[str, Any] = {"header_field": b"", "header_value": b"", "headers": {}, "name": None, "value": None}
    filename: list[str | None] = []
    problems: list[str] = []

    def on_part_begin() -> None:
        state["headers"], state["name"], state["value"] = {}, None, None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["header_field"].lower()] = state["header_value"]
        state["header_field"], state["header_value"] = b"", b""

    def on_headers_finished() -> None:
        disposition, params = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if b"filename" in params or name == "file":
            if name != "file":
                problems.append(f"unexpected file field {name!r}; the file goes in the field `file`")
            elif filename:
                problems.append("send one file (field `file`), not several")
            else:
                raw = params.get(b"filename")
                filename.append(raw.decode("utf-8", "replace") if raw is not None else None)
                state["value"] = writer
                return
        if len(fields) >= max_fields:
            problems.append(f"too many form fields (at most {max_fields})")
        state["value"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        value = state["value"]
        if value is writer:
            writer.add(data[start:end])
        elif isinstance(value, bytearray):
            value += data[start:end]
            if len(value) > MAX_FIELD_BYTES:
                problems.append(f"form field {state['name']!r} is larger than {MAX_FIELD_BYTES} bytes")
                state["value"] = None

    def on_part_end() -> None:
        value = state["value"]
        if isinstance(value, bytearray) and state["name"] is not None:
            try:
                fields[state["name"]] = value.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"form field {state['name']!r} is not UTF-8 text")
        state["value"] = None

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    try:
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                if problems:
                    raise RequestValidationFailed(problems[0])
                await writer.flush()
            parser.finalize()
        except (MultipartParseError, ValueError) as exc:
            raise InvalidInput(f"the multipart body cannot be read: {exc}") from exc
        if problems:
            raise RequestValidationFailed(problems[0])
        await writer.flush(force=True)
    except BaseException:
        await writer.abandon()
        raise
    if not filename:
        raise RequestValidationFailed(f"multipart field `file` ({what}) is required")
    return StreamedUpload(filename[0], fields, writer.bytes)
