"""Reading a ``Content-Type`` (or ``Accept`` item) header: the one place that knows its syntax.

``media_type`` gives the type without parameters, lower-cased (``"text/csv; charset=utf-8"`` →
``"text/csv"``; a missing header → ``""``). It takes the header as text (Starlette's headers) or as
the raw bytes of an ASGI scope (the middleware, which sees headers before any framework does).
"""

from __future__ import annotations


def media_type(header: str | bytes | None) -> str:
    """The media type of a ``Content-Type`` header, without parameters, lower-cased; ``""`` if absent."""
    if header is None:
        return ""
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    return text.split(";", 1)[0].strip().lower()
