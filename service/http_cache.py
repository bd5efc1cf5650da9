"""HTTP caching of immutable reads: strong ETags, ``If-None-Match`` → 304, and pre-rendered bodies.

Models, their centroids and artifacts never change once registered, and datasets are immutable, so
a read of them can be answered with a strong ETag and ``Cache-Control: private, max-age=86400,
immutable`` (private: responses depend on the caller's API key). A client (or a private cache)
revalidating with ``If-None-Match`` gets ``304 Not Modified`` without a body.

:class:`RenderedCache` keeps response bodies already rendered to bytes (assignments), keyed by
tuples, bounded by total bytes and entries. Each entry records the serving generation (see
:mod:`service.db.changes`) it was computed under; an entry of another generation is a miss, so a
deleted model or dataset stops being answered from the cache as soon as this process sees the new
generation (at once in the process that deleted it, within the catalog's staleness bound elsewhere).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import Response

CACHE_CONTROL = "private, max-age=86400, immutable"
ETAG_VERSION = "2"  # bump when the rendering of a cached representation changes (2: metric names)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_ENTRIES = 4096

Key = tuple[Hashable, ...]

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E / obs-text (RFC 9110 §8.8.3)
_ENTITY_TAG = re.compile(r'(?:W/)?("[\x21\x23-\x7e\x80-\xff]*")')


def strong_etag(*parts: str) -> str:
    """A strong ETag (quoted) derived from identifying parts, e.g. (model id, artifact sha256, kind)."""
    digest = hashlib.sha256("\x1f".join((ETAG_VERSION, *parts)).encode("utf-8")).hexdigest()
    return f'"{digest[:32]}"'


def content_etag(body: bytes) -> str:
    """A strong ETag of the exact bytes of a representation."""
    return f'"{hashlib.sha256(body).hexdigest()[:32]}"'


def parse_if_none_match(value: str | None) -> list[str] | None:
    """The opaque tags of an ``If-None-Match`` value, ``W/`` prefixes dropped; ``None`` for ``*``.

    An absent or empty header gives ``[]`` (nothing matches). Malformed members are ignored.
    """
    if value is None:
        return []
    text = value.strip()
    if text == "*":
        return None
    return _ENTITY_TAG.findall(text)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.2: does ``If-None-Match`` match the current ETag (weak comparison)?"""
    if not if_none_match:
        return False
    tags = parse_if_none_match(if_none_match)
    if tags is None:
        return True
    opaque = etag[2:] if etag.startswith("W/") else etag
    return opaque in tags


def if_none_match(headers: Headers) -> str | None:
    """Every ``If-None-Match`` header of a request as one list value (``None`` without one)."""
    values = headers.getlist("if-none-match")
    if not values:
        return None
    return values[0] if len(values) == 1 else ", ".join(values)


def cache_headers(etag: str) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": CACHE_CONTROL}


def not_modified(etag: str) -> Response:
    """A 304 with the validator and caching headers the 200 would carry, and no body."""
    return Response(status_code=304, headers=cache_headers(etag))


def openapi_cache_headers() -> dict[str, Any]:
    """OpenAPI ``headers`` of a cacheable response."""
    return {
        "ETag": {
            "description": "Strong validator of this representation; send it back in `If-None-Match`.",
            "schema": {"type": "string"},
        },
        "Cache-Control": {
            "description": f"`{CACHE_CONTROL}`: the resource is immutable; private because API keys are used.",
            "schema": {"type": "string"},
        },
    }


def openapi_not_modified() -> dict[str, Any]:
    return {
        "description": "Not Modified: `If-None-Match` matched the current ETag. No body.",
        "headers": openapi_cache_headers(),
    }


class PrerenderedResponse(Response):
    """A 200 whose status line headers were encoded once: building it is two assignments."""

    def __init__(self, body: bytes, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = 200
        self.body = body
        self.background = None
        self.raw_headers = raw_headers


@dataclass(frozen=True, slots=True)
class Rendered:
    """A response body rendered once, with its ETag and the serving generation it was built under."""

    etag: str
    body: bytes
    generation: int
    media_type: str = "application/json"
    raw_headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        headers = (
            (b"content-length", str(len(self.body)).encode("latin-1")),
            (b"content-type", self.media_type.encode("latin-1")),
            (b"etag", self.etag.encode("latin-1")),
            (b"cache-control", CACHE_CONTROL.encode("latin-1")),
        )
        object.__setattr__(self, "raw_headers", headers)

    def response(self) -> Response:
        """The 200 carrying the body, its ETag and Cache-Control (no per-request encoding)."""
        return PrerenderedResponse(self.body, list(self.raw_headers))


class RenderedCache:
    """A thread-safe LRU of :class:`Rendered` bodies, bounded by total bytes and by entries."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, Rendered] = OrderedDict()
        self._bytes = 0
        self._generation: int | None = None
        self._lock = threading.Lock()
        self._flights: dict[Key, list[Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def get(self, key: Key, generation: int) -> Rendered | None:
        """The entry of ``key`` if it was built under ``generation``; an older one is dropped."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.generation != generation:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return entry

    def put(self, key: Key, entry: Rendered) -> bool:
        """Store ``entry`` (False if it alone exceeds the byte bound); evicts least recently used."""
        size = len(entry.body)
        if size > self.max_bytes or self.max_entries <= 0:
            return False
        with self._lock:
            if self._generation is None or entry.generation > self._generation:
                # The generation moved: entries of older generations can never hit again.
                self._generation = entry.generation
                for stale in [k for k, e in self._entries.items() if e.generation != entry.generation]:
                    self._drop(stale)
            elif entry.generation < self._generation:
                return False  # computed before a change this cache has already seen
            if key in self._entries:
                self._drop(key)
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes or len(self._entries) > self.max_entries:
                self._drop(next(iter(self._entries)))
        return True

    def discard(self, predicate: Callable[[Key], bool]) -> int:
        """Drop every entry whose key satisfies ``predicate``; how many were dropped."""
        with self._lock:
            doomed = [key for key in self._entries if predicate(key)]
            for key in doomed:
                self._drop(key)
        return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @contextmanager
    def flight(self, key: Key) -> Iterator[None]:
        """Serialise the computations of one key (threads): the second caller waits, then finds the
        first one's entry in the cache instead of computing it again."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = [threading.Lock(), 0]
            flight[1] += 1
        try:
            with flight[0]:
                yield
        finally:
            with self._lock:
                flight[1] -= 1
                if flight[1] == 0:
                    del self._flights[key]

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self._bytes -= len(entry.body)
