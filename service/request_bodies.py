"""Bodies the routers read themselves (multipart uploads, JSON checked before it is parsed).

Most routes let FastAPI parse their body. A few read it by hand — to accept either multipart or
JSON, or to refuse an oversized request before building it — and these helpers give them the
same errors FastAPI's own parsing would: 422 for a body that is not the documented JSON, 400 for
one that cannot even be decoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
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
