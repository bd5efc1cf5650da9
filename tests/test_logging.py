"""Log lines: readable text for a person at a terminal, JSON lines for files, pipes and collectors."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from service.logging_setup import JsonFormatter, TextFormatter, configure_logging, resolve_format
from service.request_context import reset_request_id, set_request_id


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_auto_is_text_on_a_terminal_and_json_elsewhere() -> None:
    assert resolve_format("auto", Terminal()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    closed = io.StringIO()
    closed.close()
    assert resolve_format("auto", closed) == "json"
    assert resolve_format("json", Terminal()) == "json" and resolve_format("text", io.StringIO()) == "text"


@pytest.mark.parametrize(("stream", "formatter"), [(Terminal(), TextFormatter), (io.StringIO(), JsonFormatter)])
def test_configure_logging_picks_the_formatter_by_stderr(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None, stream: io.StringIO, formatter: type
) -> None:
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO", "auto")
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_centroid", False)]
    assert len(ours) == 1 and type(ours[0].formatter) is formatter
    logging.getLogger("centroid.test").info("claimed sweep", extra={"sweep": "which-k", "worker_id": "w1"})
    line = stream.getvalue().strip()
    if formatter is JsonFormatter:
        assert json.loads(line) | {"ts": None} == {
            "ts": None,
            "level": "INFO",
            "logger": "centroid.test",
            "msg": "claimed sweep",
            "sweep": "which-k",
            "worker_id": "w1",
        }
    else:
        assert line.endswith("INFO    centroid.test claimed sweep  sweep=which-k worker_id=w1")


def test_text_lines_carry_the_request_id_extras_and_the_traceback() -> None:
    token = set_request_id("abc123")
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            record = logging.getLogger("centroid.x").makeRecord(
                "centroid.x", logging.ERROR, __file__, 1, "failed %s", ("job-1",), sys.exc_info(), extra={"job": "j"}
            )
        text = TextFormatter().format(record)
    finally:
        reset_request_id(token)
    first, *rest = text.splitlines()
    assert first.endswith("ERROR   centroid.x failed job-1  request_id=abc123 job=j")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


def test_a_server_on_a_pipe_logs_json_and_on_a_terminal_logs_text(tmp_path: object) -> None:
    """The real process: stderr a pipe gives JSON lines, a pseudo-terminal gives text."""
    program = (
        "import logging; from service.settings import Settings; from service.logging_setup import configure_logging;"
        "s = Settings(); configure_logging(s.log_level, s.log_format);"
        "logging.getLogger('centroid').warning('hello', extra={'port': 8000})"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CENTROID_")}
    piped = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(piped.stderr.strip().splitlines()[-1])["msg"] == "hello"
    leader, follower = os.openpty()
    try:
        subprocess.run([sys.executable, "-c", program], stderr=follower, env=env, timeout=60, check=True)
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
    assert output.decode().strip().splitlines()[-1].endswith("WARNING centroid hello  port=8000")
