"""A small typed client of Centroid's HTTP API, over httpx.

- **Where and who**: a base URL and an optional API key, sent as ``Authorization: Bearer <key>``
  (``service/auth.py``). :func:`resolve_target` takes them from flags or ``CENTROID_URL`` /
  ``CENTROID_API_KEY``.
- **Errors**: every answer of 400 or more raises :class:`ApiError`, built from the service's one
  error body ``{"error": {"code", "message", "details", "request_id"}}``; a server that cannot be
  reached raises :class:`Unreachable`, naming the URL. Both are :class:`ClientError`, whose
  ``message`` is what to show a person.
- **Waiting**: :meth:`CentroidClient.wait_for_training_job` follows a job with Server-Sent Events
  (``GET /training-jobs/{name}/events``: ``event: progress`` messages whose data is the job's JSON,
  then ``event: end``) and falls back to polling ``GET /training-jobs/{name}`` when the server has no
  such route; :meth:`CentroidClient.wait_for_endpoint` polls (endpoints have no events).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "CENTROID_URL"
API_KEY_ENV = "CENTROID_API_KEY"

#: A training job in one of these states changes no more.
TERMINAL_JOB_STATUSES = frozenset({"Completed", "Failed", "Stopped"})
#: An endpoint being created or switched ends in one of these.
SETTLED_ENDPOINT_STATUSES = frozenset({"InService", "Failed"})
#: How often ``--wait`` polls when there is no event stream.
POLL_SECONDS = 0.5
#: Longest silence tolerated on an event stream (the server sends keep-alive comments far more often).
EVENT_READ_TIMEOUT = 60.0

JsonObject = dict[str, Any]
Progress = Callable[[JsonObject], None]


class ClientError(Exception):
    """A call that did not succeed; ``message`` is what to tell the person or script."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ApiError(ClientError):
    """The service answered with an error status (its error body, when it sent one)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details
        self.request_id = request_id

    @property
    def route_missing(self) -> bool:
        """A 404 for the path itself (no such route on this server), not for a named resource: the
        framework's bare "Not Found", where a missing job or model is named in the message and details."""
        return self.status == 404 and self.details is None and self.message == "Not Found"

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status} {self.code})"


class Unreachable(ClientError):
    """Nothing answered at the URL (connection refused, DNS, timeout, connection dropped)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"could not reach Centroid at {url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """Where the service is and the key to send it."""

    url: str
    api_key: str | None


def resolve_target(url: str | None, api_key: str | None, environ: Mapping[str, str] | None = None) -> Target:
    """Flags first, then ``CENTROID_URL`` / ``CENTROID_API_KEY``, then ``http://127.0.0.1:8000`` and no key.

    Raises ``ValueError`` for a URL that is not ``http://`` or ``https://`` with a host (a usage error)."""
    env = os.environ if environ is None else environ
    chosen = (url or env.get(URL_ENV) or DEFAULT_URL).strip()
    parts = urlsplit(chosen)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http:// or https:// URL: {chosen!r}")
    key = api_key if api_key is not None else env.get(API_KEY_ENV)
    return Target(chosen.rstrip("/"), key.strip() if key and key.strip() else None)


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched message of an event stream."""

    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


def parse_event_stream(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """The messages of a ``text/event-stream`` (the WHATWG HTML rules): ``field: value`` lines, a
    blank line dispatches, ``:`` starts a comment (keep-alives), several ``data`` lines join with
    newlines, a message without data is not dispatched, and an unfinished one at the end is dropped."""
    event, last_id = "", None
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data), last_id)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value


def api_error(response: httpx.Response) -> ApiError:
    """The service's error body as an exception (a body in another shape still gives the status)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return ApiError(
            response.status_code,
            str(error.get("code") or "error"),
            error["message"],
            error.get("details"),
            error.get("request_id"),
        )
    text = response.text.strip()[:300] or response.reason_phrase or "error"
    return ApiError(response.status_code, "http_error", text)


def _segment(value: str) -> str:
    """A path segment, escaped (names and ids come from the command line)."""
    return quote(value, safe="")


class CentroidClient:
    """Centroid's API over one httpx connection pool. Use it as a context manager (or ``close()``)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"User-Agent": "centroid-cli"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = timeout
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    @classmethod
    def for_target(cls, target: Target, **options: Any) -> CentroidClient:
        return cls(target.url, target.api_key, **options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CentroidClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------------

    def request(self, method: str, path: str, **options: Any) -> httpx.Response:
        """Send a request; :class:`ApiError` for an error status, :class:`Unreachable` for no answer."""
        try:
            response = self._http.request(method, path, **options)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise api_error(response)
        return response

    def _json(self, method: str, path: str, **options: Any) -> JsonObject:
        return cast(JsonObject, self.request(method, path, **options).json())

    def _unreachable(self, exc: httpx.TransportError) -> Unreachable:
        if isinstance(exc, httpx.ConnectError):
            text = str(exc).lower()
            reason = "connection refused" if "refused" in text else f"cannot connect ({exc})"
        elif isinstance(exc, httpx.TimeoutException):
            reason = f"no answer within {self._timeout:g} s ({type(exc).__name__})"
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return Unreachable(self.url, reason)

    def events(self, path: str) -> Generator[ServerSentEvent, None, None]:
        """The messages of an event stream at ``path``, until the server closes it."""
        timeout = httpx.Timeout(self._timeout, read=EVENT_READ_TIMEOUT)
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        try:
            with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise api_error(response)
                content_type = response.headers.get("content-type", "")
                if not content_type.startswith("text/event-stream"):
                    raise ClientError(f"GET {path} answered {content_type or 'no content type'}, not an event stream")
                yield from parse_event_stream(response.iter_lines())
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    # --- datasets -----------------------------------------------------------------------------------

    def upload_csv(self, path: Path, *, name: str, key_column: str | None = None) -> JsonObject:
        """``POST /datasets`` (multipart; the file is streamed, not read into memory)."""
        form = {"name": name}
        if key_column:
            form["key_column"] = key_column
        with path.open("rb") as file:
            return self._json("POST", "/datasets", data=form, files={"file": (path.name, file, "text/csv")})

    def dataset(self, dataset_id: str) -> JsonObject:
        return self._json("GET", f"/datasets/{_segment(dataset_id)}")

    def derive(self, dataset_id: str, body: JsonObject) -> JsonObject:
        return self._json("POST", f"/datasets/{_segment(dataset_id)}/derive", json=body)

    # --- training jobs and models -------------------------------------------------------------------

    def create_training_job(self, body: JsonObject) -> JsonObject:
        return self._json("POST", "/training-jobs", json=body)

    def training_job(self, name: str) -> JsonObject:
        return self._json("GET", f"/training-jobs/{_segment(name)}")

    def wait_for_training_job(
        self,
        name: str,
        on_update: Progress | None = None,
        *,
        poll_seconds: float = POLL_SECONDS,
        timeout: float | None = None,
    ) -> JsonObject:
        """The job once it is Completed, Failed or Stopped. Follows ``/training-jobs/{name}/events``
        (reconnecting after an ``event: timeout``) while the server has that route; without it (404 on
        the route), with no stream free (503), or after a stream broke off, polls
        ``GET /training-jobs/{name}`` every ``poll_seconds``. ``on_update`` sees each state of the job
        as it arrives."""
        deadline = None if timeout is None else time.monotonic() + timeout
        notify = on_update or (lambda _job: None)
        follow = True
        while follow:
            follow = False
            try:
                with closing(self.events(f"/training-jobs/{_segment(name)}/events")) as stream:
                    for message in stream:
                        if message.event == "timeout":  # the server's bound on one stream: follow on
                            follow = True
                            break
                        if message.event not in ("progress", "end"):
                            continue  # "gone" (deleted meanwhile): the poll below says so
                        try:
                            body = message.json()
                        except ValueError:
                            body = None
                        if isinstance(body, dict) and "status" in body:
                            notify(body)
                            if body["status"] in TERMINAL_JOB_STATUSES:
                                return body
                        if message.event == "end":
                            break
                        if deadline is not None and time.monotonic() > deadline:
                            raise ClientError(f"training job {name!r} did not finish within {timeout:g} s")
            except ApiError as error:
                if not (error.route_missing or error.status == 503):  # no events here, or no stream free
                    raise
            except Unreachable:
                pass  # the stream broke off: polling says whether the server is still there
        while True:
            job = self.training_job(name)
            notify(job)
            if job["status"] in TERMINAL_JOB_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"training job {name!r} did not finish within {timeout:g} s (it is {job['status']})")
            time.sleep(poll_seconds)

    def model(self, model_id: str) -> JsonObject:
        return self._json("GET", f"/models/{_segment(model_id)}")

    def assignments(self, model_id: str, *, cluster: int | None = None, dataset_id: str | None = None) -> JsonObject:
        params: dict[str, str | int] = {}
        if cluster is not None:
            params["cluster"] = cluster
        if dataset_id:
            params["dataset_id"] = dataset_id
        return self._json("GET", f"/models/{_segment(model_id)}/assignments", params=params)

    def plot(self, model_id: str, kind: str, fmt: str = "png") -> bytes:
        """``GET /models/{id}/plots/{kind}.{fmt}``: the image's bytes."""
        return self.request("GET", f"/models/{_segment(model_id)}/plots/{_segment(kind)}.{fmt}").content

    # --- endpoints ----------------------------------------------------------------------------------

    def create_endpoint(self, body: JsonObject) -> JsonObject:
        return self._json("POST", "/endpoints", json=body)

    def endpoint(self, name: str) -> JsonObject:
        return self._json("GET", f"/endpoints/{_segment(name)}")

    def wait_for_endpoint(
        self,
        name: str,
        on_update: Progress | None = None,
        *,
        poll_seconds: float = POLL_SECONDS,
        timeout: float | None = None,
    ) -> JsonObject:
        """The endpoint once it is InService or Failed (polled: endpoints have no event stream)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            endpoint = self.endpoint(name)
            if on_update is not None:
                on_update(endpoint)
            if endpoint["status"] in SETTLED_ENDPOINT_STATUSES:
                return endpoint
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"endpoint {name!r} is still {endpoint['status']} after {timeout:g} s")
            time.sleep(poll_seconds)

    def predictions(self, endpoint: str, body: JsonObject) -> JsonObject:
        """``POST /endpoints/{name}/predictions``: rows keyed by column, or a ``dataset_id``."""
        return self._json("POST", f"/endpoints/{_segment(endpoint)}/predictions", json=body)

    def invocations_csv(self, endpoint: str, csv_text: str) -> JsonObject:
        """``POST /endpoints/{name}/invocations`` with headerless numeric CSV (SageMaker's contract)."""
        headers = {"Content-Type": "text/csv", "Accept": "application/json"}
        return self._json(
            "POST", f"/endpoints/{_segment(endpoint)}/invocations", content=csv_text.encode(), headers=headers
        )

    # --- operations ---------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """``GET /healthz`` answers 200 (False when nothing answers yet)."""
        try:
            return self._http.get("/healthz", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False
