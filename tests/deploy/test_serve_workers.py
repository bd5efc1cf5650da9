"""`centroid serve --workers N`: N API processes, one embedded worker between them, and metrics
that add up across the processes.

The election (service/process_role.py) is checked on its own first — two locks, two processes,
two apps on one data directory — then a real `centroid serve --workers 2` on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from service.cli import build_parser
from service.main import create_app
from service.process_role import LOCK_FILE, ElectedWorker, ProcessLock
from service.settings import Settings
from tests.helpers import centroid_process, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds server processes in /proc")


# --- the election -----------------------------------------------------------------------------


def test_one_lock_per_data_dir_even_within_one_process(tmp_path: Path) -> None:
    first, second = ProcessLock(tmp_path / LOCK_FILE), ProcessLock(tmp_path / LOCK_FILE)
    assert first.try_acquire() and first.held
    assert not second.try_acquire() and not second.held
    assert first.holder_pid() == os.getpid()
    first.release()
    assert second.try_acquire()
    second.release()


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from service.process_role import ProcessLock
assert ProcessLock(Path(sys.argv[1])).try_acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    """The kernel drops a flock with its process, even on SIGKILL: no stale lock to clean up."""
    path = tmp_path / LOCK_FILE
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock = ProcessLock(path)
        assert not lock.try_acquire()
        assert lock.holder_pid() == holder.pid
        holder.kill()
        holder.wait(10)
        assert lock.try_acquire()
        lock.release()
    finally:
        holder.kill()
        holder.wait(10)


class FakeWorker:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.stopped = threading.Event()

    def start(self) -> None:
        self.started.set()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopped.set()


def test_only_one_elected_worker_runs_and_another_takes_over(tmp_path: Path) -> None:
    workers = [FakeWorker() for _ in range(3)]
    elected = [ElectedWorker(tmp_path, worker, retry_seconds=0.05) for worker in workers]
    for election in elected:
        election.start()
    try:
        assert [bool(e) for e in elected] == [True, False, False]
        assert [w.started.is_set() for w in workers] == [True, False, False]
        elected[0].stop()
        assert workers[0].stopped.is_set()
        # A process that lost the election retries; one of the others takes over, only one.
        wait_for(lambda: [bool(e) for e in elected[1:]], lambda running: sum(running) == 1, timeout=5)
        time.sleep(0.2)
        assert sum(w.started.is_set() for w in workers[1:]) == 1
    finally:
        for election in elected:
            election.stop()
    assert not any(elected) and ProcessLock(tmp_path / LOCK_FILE).try_acquire()


def test_two_apps_on_one_data_dir_run_one_embedded_worker(tmp_path: Path, database_url: str) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        log_format="text",
        log_level="WARNING",
        embedded_worker=True,
        worker_poll_interval=0.05,
    )
    with ExitStack() as stack:
        clients = [stack.enter_context(TestClient(create_app(settings))) for _ in range(2)]
        engine = create_engine(settings.resolved_database_url)
        try:
            rows = wait_for(lambda: _worker_pids(engine), lambda pids: len(pids) >= 1, timeout=10)
            time.sleep(0.3)  # the second app's worker would have registered by now
            assert _worker_pids(engine) == rows == [os.getpid()]
            for client in clients:
                assert _scrape(client.get("/metrics").text)["centroid_workers"] == 1
        finally:
            engine.dispose()


# --- the command ------------------------------------------------------------------------------


def test_workers_is_a_serve_option() -> None:
    parser = build_parser()
    assert parser.parse_args(["serve"]).workers == 1
    assert parser.parse_args(["serve", "--workers", "3"]).workers == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--workers", bad])


@pytest.fixture
def served(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    """`centroid serve --workers 2` with JSON logs, its metrics files in a known directory."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {
        "CENTROID_DATA_DIR": str(tmp_path / "data"),
        "CENTROID_DATABASE_URL": database_url,
        "CENTROID_LOG_FORMAT": "json",
        "CENTROID_WORKER_POLL_INTERVAL": "0.2",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
    }
    process = centroid_process(["serve", "--port", str(port), "--workers", "2"], env, log_path)
    try:
        # Both processes have started (each logs "centroid ready" once its lifespan ran).
        wait_for(lambda: _ready_records(log_path, process), lambda ready: len(ready) >= 2, timeout=60, interval=0.2)
        yield {
            "url": f"http://127.0.0.1:{port}",
            "process": process,
            "log": log_path,
            "metrics_dir": tmp_path / "prometheus",
            "database_url": database_url,
        }
    finally:
        children = {pid: _cmdline(pid) for pid in _children(process.pid)}
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        for pid in children:  # only those the parent could not stop (and only if that pid is still theirs)
            if _cmdline(pid) == children[pid]:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_serve_with_two_processes(served: dict[str, Any]) -> None:
    url, process = served["url"], served["process"]
    children = _children(process.pid)
    assert len(children) == 2, children

    # One process runs the embedded worker, the other serves only.
    ready = _ready_records(served["log"], process)
    assert sorted(record["embedded_worker"] for record in ready) == [False, True], ready
    engine = create_engine(served["database_url"])
    try:
        pids = wait_for(lambda: _worker_pids(engine), lambda pids: len(pids) >= 1, timeout=10)
        assert len(pids) == 1 and pids[0] in children, (pids, children)
        assert _scrape(httpx.get(f"{url}/metrics").text)["centroid_workers"] == 1

        # Requests on fresh connections reach both processes; every scrape, whichever process
        # answers it, counts all of them.
        sent = 0
        while len(_pids_with_metrics(served["metrics_dir"])) < 2:
            assert sent < 1000, "the requests never reached the second process"
            sent += _get_healthz(url, 20)
        assert _pids_with_metrics(served["metrics_dir"]) == set(children)
        for _ in range(6):
            scraped = _scrape(httpx.get(f"{url}/metrics", headers={"Connection": "close"}).text)
            assert scraped['centroid_http_requests_total{method="GET",route="/healthz",status="200"}'] == sent

        # The process with the worker dies: the lock goes with it and a live process takes over.
        os.kill(pids[0], signal.SIGKILL)
        new = wait_for(
            lambda: [pid for pid in _worker_pids(engine) if pid != pids[0] and _alive(pid)],
            lambda found: len(found) == 1,
            timeout=30,
            interval=0.2,
        )
        assert new[0] in _children(process.pid)
        assert _get_healthz(url, 10) == 10
        scraped = _scrape(httpx.get(f"{url}/metrics", headers={"Connection": "close"}).text)
        assert scraped['centroid_http_requests_total{method="GET",route="/healthz",status="200"}'] == sent + 10
    finally:
        engine.dispose()
    assert process.poll() is None


# --- helpers ----------------------------------------------------------------------------------


def _worker_pids(engine: Any) -> list[int]:
    with engine.connect() as connection:
        return [int(pid) for pid in connection.execute(text("SELECT pid FROM workers ORDER BY pid")).scalars()]


def _scrape(body: str) -> dict[str, float]:
    """Every sample as ``name{labels}`` (labels sorted) -> value."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def _get_healthz(url: str, count: int) -> int:
    """``count`` GETs, each on a new connection (so the kernel may hand it to either process)."""

    def one(_: int) -> int:
        response = httpx.get(f"{url}/healthz", headers={"Connection": "close"}, timeout=10)
        assert response.status_code == 200
        return 1

    with ThreadPoolExecutor(4) as pool:
        return sum(pool.map(one, range(count)))


def _pids_with_metrics(directory: Path) -> set[int]:
    """Processes that wrote request counters (prometheus_client names its files <type>_<pid>.db)."""
    return {int(path.stem.rsplit("_", 1)[1]) for path in directory.glob("counter_*.db")}


def _ready_records(log_path: Path, process: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    assert process.poll() is None, log_path.read_text()
    records = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("msg") == "centroid ready":
            records.append(record)
    return records


def _children(pid: int) -> list[int]:
    """The server processes uvicorn spawned (not multiprocessing's resource tracker)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            children.append(int(stat.parent.name))
    return sorted(children)


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
