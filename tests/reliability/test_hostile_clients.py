"""Authorised but hostile clients: what a connection or a request may cost (issue 16, items 5, 6, 9, 10).

The connection bounds are tested against a real ``centroid serve`` on 127.0.0.1 (the protocol of
``service.http_limits`` is what ``centroid serve`` runs), with the header and body timeouts set to
1 second. The error mapping is tested in-process.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import StatementError

from service.engine.mxnet_format import MODEL_MEMBER, NDArrayList, write_ndarray_list
from service.http_errors import _AlreadyLogged, _mark_logged
from service.logging_setup import JsonFormatter
from service.main import create_app
from service.settings import Settings
from tests.helpers import LiveServer, assert_error, centroid_process, free_port, wait_for

TIMEOUT_SECONDS = 1.0
MAX_HEADER_BYTES = 64 * 1024  # the default


@dataclass
class Served:
    port: int
    pid: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text().splitlines():
            lines.append(json.loads(raw))  # every line the server writes is JSON
        return lines

    def lines_for(self, request_id: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("request_id") == request_id]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("hostile")
    port = free_port()
    env = {
        "CENTROID_DATA_DIR": str(tmp / "data"),
        "CENTROID_DATABASE_URL": f"sqlite:///{tmp / 'centroid.db'}",
        "CENTROID_LOG_FORMAT": "json",
        "CENTROID_LOG_LEVEL": "INFO",
        "CENTROID_HEADER_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS),
        "CENTROID_BODY_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS),
    }
    log_path = tmp / "serve.log"
    process = centroid_process(["serve", "--port", str(port), "--no-worker"], env, log_path)
    server = Served(port, process.pid, log_path)

    def ready() -> bool:
        assert process.poll() is None, log_path.read_text()
        try:
            return httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, bool, timeout=60, interval=0.1)
        yield server
    finally:
        process.terminate()
        process.wait(30)
    text = log_path.read_text()
    assert "Traceback" not in text, text[-5000:]


def _read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received, time.monotonic() - started


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _body(response: bytes) -> dict[str, Any]:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


def _headers(response: bytes) -> dict[str, str]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in head)}


# Item 5: header size limit and read timeouts


def test_huge_unterminated_headers_are_refused_with_bounded_memory(served: Served) -> None:
    """Two connections each sending a 128 MiB unterminated header: 431 after the first ~64 KiB,
    the server does not grow (it grew by 256 MB before)."""
    before = served.rss_mib()
    outcomes: list[tuple[int, bytes]] = []

    def attack() -> None:
        with served.connect() as sock:
            sock.sendall(b"GET /datasets HTTP/1.1\r\nHost: x\r\nX-Junk: ")
            chunk = b"a" * (1 << 20)
            sent = 0
            try:
                for _ in range(128):
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:  # the server closed the connection
                pass
            response, _ = _read_response(sock)
            outcomes.append((sent, response))

    threads = [threading.Thread(target=attack) for _ in range(2)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert time.monotonic() - started < 30
    assert len(outcomes) == 2
    for sent, response in outcomes:
        assert sent < 64 * (1 << 20), "the server kept reading the header"
        assert response == b"" or _status(response) == 431, response[:200]
    assert served.rss_mib() - before < 48, (before, served.rss_mib())
    assert httpx.get(f"{served.url}/healthz", timeout=5).status_code == 200


def test_a_header_over_the_limit_gets_431_in_the_error_shape(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * (MAX_HEADER_BYTES + 1024) + b"\r\n\r\n")
        response, _ = _read_response(sock)
    assert _status(response) == 431
    error = _body(response)["error"]
    assert error["code"] == "request_header_fields_too_large"
    assert error["details"] == {"limit_bytes": MAX_HEADER_BYTES}
    assert _headers(response)["connection"] == "close"


def test_headers_just_under_the_limit_are_served(served: Served) -> None:
    padding = "a" * (MAX_HEADER_BYTES - 2048)
    response = httpx.get(f"{served.url}/healthz", headers={"X-Padding": padding}, timeout=5)
    assert response.status_code == 200


def test_trickled_headers_are_cut_after_the_header_timeout(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(b"GET /datasets HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        sock.settimeout(0.2)
        response = b""
        while time.monotonic() - started < 10:
            try:
                sock.sendall(b"a")  # one byte every 0.2 s: the connection never goes idle
                response = sock.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - started
        if not response:
            response, _ = _read_response(sock)
    assert TIMEOUT_SECONDS * 0.8 < elapsed < TIMEOUT_SECONDS + 3, elapsed
    assert _status(response) == 408
    assert _body(response)["error"]["code"] == "request_timeout"


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(served: Served) -> None:
    with served.connect() as sock:
        response, elapsed = _read_response(sock)
    assert response == b""
    assert TIMEOUT_SECONDS * 0.8 < elapsed < TIMEOUT_SECONDS + 3, elapsed


def test_the_header_timeout_also_applies_to_the_next_request_on_a_kept_alive_connection(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert _status(first) == 200
        time.sleep(TIMEOUT_SECONDS * 1.5)  # longer than the header timeout, shorter than keep-alive (5 s)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        response, elapsed = _read_response(sock)
    assert _status(response) == 408
    assert TIMEOUT_SECONDS * 0.8 < elapsed < TIMEOUT_SECONDS + 3, elapsed


def test_a_trickled_body_is_cut_after_the_body_timeout(served: Served) -> None:
    request_id = "hostile-trickle-1"
    with served.connect() as sock:
        sock.sendall(
            b"POST /datasets HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Request-ID: " + request_id.encode() + b"\r\nContent-Length: 100000\r\n\r\n{"
        )
        started = time.monotonic()
        sock.settimeout(0.2)
        response = b""
        while time.monotonic() - started < 10:
            try:
                sock.sendall(b" ")
                response = sock.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - started
        if not response:
            response, _ = _read_response(sock)
    assert TIMEOUT_SECONDS * 0.8 < elapsed < TIMEOUT_SECONDS + 3, elapsed
    assert _status(response) == 408
    assert _headers(response)["x-request-id"] == request_id
    error = _body(response)["error"]
    assert error["code"] == "request_timeout" and error["request_id"] == request_id
    lines = wait_for(
        lambda: served.lines_for(request_id),
        lambda found: any(x.get("status") == 408 for x in found if x["logger"] == "centroid.access"),
        timeout=10,
    )
    assert not [line for line in lines if line["level"] == "ERROR"], lines


def test_a_body_sent_steadily_over_longer_than_the_timeout_is_accepted(served: Served) -> None:
    """The body timeout grows with the bytes received (1 s per 10 KiB by default): a 300 KiB body
    sent in pieces over ~1.5 s is fine although the timeout is 1 s."""
    document = {"name": "steady", "columns": ["k", "x"], "rows": [["a", 1], ["b", 2]]}
    body = json.dumps(document).encode() + b" " * (300 * 1024)
    with served.connect() as sock:
        sock.sendall(
            b"POST /datasets HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
        )
        pieces = [body[i : i + 30 * 1024] for i in range(0, len(body), 30 * 1024)]
        started = time.monotonic()
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(1.5 / len(pieces))
        assert time.monotonic() - started > TIMEOUT_SECONDS
        response, _ = _read_response(sock)
    assert _status(response) == 201, response[:500]


# Item 9: a client that goes away is not a server error


@pytest.mark.parametrize("path", ["/datasets", "/training-jobs"])  # read by hand; parsed by FastAPI
def test_a_half_closed_body_is_a_client_disconnect_not_a_500(served: Served, path: str) -> None:
    request_id = f"hostile-disconnect{path.replace('/', '-')}"
    with served.connect() as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Request-ID: {request_id}\r\nContent-Length: 1000\r\n\r\nhello".encode()
        )
        sock.shutdown(socket.SHUT_WR)
        response, _ = _read_response(sock)
    assert response == b""  # nothing to answer: the client is gone

    def access(lines: list[dict[str, Any]]) -> bool:
        return any(line["logger"] == "centroid.access" for line in lines)

    lines = wait_for(lambda: served.lines_for(request_id), access, timeout=10)
    assert [line["status"] for line in lines if line["logger"] == "centroid.access"] == [499]
    assert [line["level"] for line in lines] == ["INFO", "INFO"], lines
    assert "client disconnected" in lines[0]["msg"]
    assert all("exc" not in line for line in lines)
    metrics = httpx.get(f"{served.url}/metrics", timeout=5).text
    assert f'route="{path}",status="499"' in metrics
    assert f'route="{path}",status="500"' not in metrics


def test_every_server_log_line_is_json(served: Served) -> None:
    """Item 10: nothing but JSON lines in the server's output (no RuntimeWarning lines)."""
    assert served.log_lines()


# Item 10: 500s are logged once, with the request id; no warning lines from a 1e300 model


class _Lines(logging.Handler):
    """Log lines formatted as the service formats them, at the moment they are logged."""

    def __init__(self) -> None:
        super().__init__()
        self.formatter_ = JsonFormatter()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.formatter_.format(record)))


@pytest.fixture
def log_lines() -> Iterator[list[dict[str, Any]]]:
    handler = _Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)


def test_a_500_is_logged_once_with_the_request_id(settings: Settings, log_lines: list[dict[str, Any]]) -> None:
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with LiveServer(app) as server:
        response = httpx.get(f"{server.url}/boom", headers={"X-Request-ID": "req-boom"}, timeout=10)
    assert_error(response, 500, "internal_error")
    assert response.json()["error"]["request_id"] == "req-boom"
    errors = [line for line in log_lines if line["level"] == "ERROR"]
    assert len(errors) == 1, errors  # not a second time by uvicorn ("Exception in ASGI application")
    assert errors[0]["request_id"] == "req-boom"
    assert "RuntimeError: secret internals" in errors[0]["exc"]
    assert "GET /boom" in errors[0]["msg"]


def test_uvicorn_logs_only_exceptions_not_already_logged() -> None:
    logged, fresh = RuntimeError("a"), RuntimeError("b")
    _mark_logged(logged)

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception", (), (type(exc), exc, None))

    only_new = _AlreadyLogged()
    assert not only_new.filter(record(logged))
    assert only_new.filter(record(fresh))
    assert only_new.filter(logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "started", (), None))


def _model_tar(centroids: np.ndarray) -> bytes:
    payload = write_ndarray_list(NDArrayList(arrays=[centroids]))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(MODEL_MEMBER)
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_importing_float64_centroids_beyond_float32_is_a_400_without_a_warning(client: TestClient) -> None:
    data = _model_tar(np.full((2, 3), 1e300, dtype=np.float64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        response = client.post(
            "/models/import",
            files={"file": ("model.tar.gz", data, "application/gzip")},
            data={"name": "huge", "feature_names": json.dumps(["a", "b", "c"])},
        )
    assert_error(response, 400, "invalid_input", "float32")
    assert [str(w.message) for w in caught] == []


# Item 6 (the generic part): an OverflowError is the client's number, not a server error


def test_an_overflow_error_anywhere_is_a_400_naming_the_reason(
    settings: Settings, log_lines: list[dict[str, Any]]
) -> None:
    app = create_app(settings)

    @app.post("/overflow")
    def overflow() -> None:
        float(10**400)

    @app.post("/overflow-in-the-database")
    def overflow_in_the_database() -> None:
        raise StatementError("bind failed", "INSERT ...", {}, OverflowError("Python int too large to convert"))

    with TestClient(app) as client:
        first = client.post("/overflow", headers={"X-Request-ID": "req-ovf"})
        second = client.post("/overflow-in-the-database")
        metrics = client.get("/metrics").text
    error = assert_error(first, 400, "invalid_input", "too large")
    assert error["details"] == {"reason": "int too large to convert to float"}
    assert error["request_id"] == "req-ovf"
    assert assert_error(second, 400, "invalid_input")["details"] == {"reason": "Python int too large to convert"}
    assert not [line for line in log_lines if line["level"] == "ERROR" or "exc" in line], log_lines
    warning = next(line for line in log_lines if line["logger"] == "centroid.errors")
    assert warning["level"] == "WARNING" and warning["request_id"] == "req-ovf"
    assert "test_hostile_clients.py" in warning["msg"]  # where it happened
    assert 'route="/overflow",status="400"' in metrics
    assert 'status="500"' not in metrics


def test_the_bounds_apply_in_every_process_of_serve_workers(tmp_path: Path) -> None:
    """``--workers N`` processes load the protocol by name and read the limits from the environment."""
    port = free_port()
    env = {
        "CENTROID_DATA_DIR": str(tmp_path / "data"),
        "CENTROID_DATABASE_URL": f"sqlite:///{tmp_path / 'centroid.db'}",
        "CENTROID_HEADER_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS),
    }
    process = centroid_process(["serve", "--port", str(port), "--workers", "2", "--no-worker"], env, tmp_path / "log")
    try:

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, bool, timeout=60, interval=0.1)
        outcomes: list[tuple[bytes, float]] = []

        def probe() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                outcomes.append(_read_response(sock))

        probes = [threading.Thread(target=probe) for _ in range(6)]  # spread over both processes
        for thread in probes:
            thread.start()
        for thread in probes:
            thread.join(30)
        assert len(outcomes) == len(probes)
        for response, elapsed in outcomes:
            assert _status(response) == 408
            assert elapsed < TIMEOUT_SECONDS + 3, elapsed
    finally:
        process.terminate()
        process.wait(30)


# The reverse-proxy example (deploy/nginx.conf) refuses first what Centroid would refuse

NGINX_EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"


def _directive(text: str, name: str) -> list[str]:
    match = re.search(rf"^\s*{name}\s+([^;]+);", text, re.M)
    assert match, name
    return match.group(1).split()


def _size(value: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024}
    return int(value[:-1]) * units[value[-1].lower()] if value[-1].lower() in units else int(value)


def test_the_nginx_example_is_at_least_as_strict_as_the_defaults() -> None:
    text = NGINX_EXAMPLE.read_text()
    defaults = Settings.model_construct()  # the defaults, whatever the environment says
    count, size = _directive(text, "large_client_header_buffers")
    assert int(count) * _size(size) <= defaults.max_header_bytes
    assert _size(_directive(text, "client_max_body_size")[0]) <= defaults.max_upload_bytes
    assert float(_directive(text, "client_header_timeout")[0].rstrip("s")) <= defaults.header_timeout_seconds
    assert float(_directive(text, "client_body_timeout")[0].rstrip("s")) <= defaults.body_timeout_seconds
    assert _directive(text, "proxy_request_buffering") == ["on"]
    upstream = text[text.index("upstream centroid") :]
    upstream_keepalive = float(_directive(upstream, "keepalive_timeout")[0].rstrip("s"))
    assert upstream_keepalive < 5  # uvicorn's keep-alive (`centroid serve` keeps its default)


@pytest.mark.skipif(not (shutil.which("nginx") and shutil.which("openssl")), reason="needs nginx and openssl")
def test_the_nginx_example_is_valid(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=centroid"]
        + ["-keyout", str(tls / "centroid.key"), "-out", str(tls / "centroid.crt")],
        check=True,
        capture_output=True,
    )
    snippet = tmp_path / "centroid.conf"
    snippet.write_text(NGINX_EXAMPLE.read_text().replace("/etc/nginx/tls", str(tls)))
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path}/body;\n"
        f"  proxy_temp_path {tmp_path}/proxy;\n  include {snippet};\n}}\n"
    )
    result = subprocess.run(
        ["nginx", "-t", "-c", str(main), "-e", str(tmp_path / "error.log")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
