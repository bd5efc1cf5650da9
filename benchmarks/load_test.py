"""Load test: a real ``centroid serve`` on 127.0.0.1 under a mixed load, checked for lost work.

    python benchmarks/load_test.py --seconds 60                 # the documented full run (SQLite)
    python benchmarks/load_test.py --seconds 60 --separate-worker --kill-worker-at 20 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/centroid_load

It starts ``centroid serve`` as a subprocess (embedded worker on; or ``--no-worker`` plus one
``centroid worker`` process with ``--separate-worker``) on a fresh data directory, with a short
job lease (``--lease-seconds``, 5), trains one model and deploys it on two endpoints, then:

1. **baselines**, same process, same client, same payloads: *idle* — both endpoints invoked one
   request at a time on the idle server; *invocations only* — ``--concurrency`` invokers and
   nothing else for ``--baseline-seconds`` (separates queueing from interference);
2. **load**: for ``--seconds`` runs, concurrently, ``--concurrency`` invokers (text/csv on
   ``ep-csv`` and JSON on ``ep-json``), one client that submits training jobs, one that uploads
   CSV datasets, and one that asks for predictions and reads (GET) jobs, datasets and endpoints;
   with ``--kill-worker-at SECONDS`` (needs ``--separate-worker``), that far into the load a
   slower job (``KILL_TARGET_TRAINING``) is submitted and, as soon as ``GET
   /training-jobs?status=InProgress`` shows the worker training it, the ``centroid worker`` is
   SIGKILLed and a replacement started at once with the same environment;
3. **checks**: no 5xx (nor any other unexpected status or transport error); every accepted job
   reaches a final state within ``--drain-seconds`` and each Completed job has exactly one model;
   every uploaded dataset is listed and readable with the right row count; after a kill, the job
   the killed worker held was still InProgress just after the kill, then retaken (one more
   attempt) and Completed with one model.

It prints p50/p95/p99 invocation latency under load and their ratios to both baselines,
throughput and status counts (and what the kill did), and exits 1 if a check failed. Timings are
reported, never judged: the machine decides them. ``tests/reliability/test_load.py`` runs a few
seconds of it in CI, with the kill on PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]

FEATURES = 2
CENTERS = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
TRAIN_ROWS = 300
UPLOAD_ROWS = 2_000
INVOKE_ROWS = 5
TRAINING = {"k": 3, "seed": 1}
# The job the worker is killed in, submitted when the kill is due: the same data and k in many small
# mini-batches (1-2 s of training on a 2-CPU VM), so the kill, sent as soon as the worker has
# taken it, lands mid-training — the submitter's own jobs train in ~20 ms and would mostly be missed.
KILL_TARGET_TRAINING = {**TRAINING, "mini_batch_size": 10, "epochs": 500}
KILL_HOLD_TIMEOUT = 30.0  # bound on the wait for the worker to take the kill target
EXPECTED = {
    "invoke-csv": {200},
    "invoke-json": {200},
    "predictions": {200},
    "get": {200},
    "submit-job": {202},
    "upload": {201},
}


# --- the server under test ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    data_dir: Path
    work_dir: Path
    env: dict[str, str]
    logs: list[Path] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)  # indices into ``processes`` killed on purpose

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.logs if path.exists())

    def start(self, command: list[str]) -> subprocess.Popen[bytes]:
        """``centroid <command>`` with the server's environment, logging to its own file."""
        log_path = self.work_dir / f"{command[0]}-{len(self.processes)}.log"
        self.logs.append(log_path)
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", *command],
                cwd=REPO,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        self.commands.append(command)
        return process

    def kill_and_replace_worker(self) -> tuple[int, int]:
        """SIGKILL the running ``centroid worker`` and start another with the same environment.

        Returns the pids of the killed and of the new worker."""
        index = next(
            i
            for i, (command, process) in enumerate(zip(self.commands, self.processes, strict=True))
            if command[0] == "worker" and i not in self.killed and process.poll() is None
        )
        victim = self.processes[index]
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        self.killed.add(index)
        return victim.pid, self.start(self.commands[index]).pid


@contextmanager
def centroid_server(
    work_dir: Path,
    database_url: str | None = None,
    separate_worker: bool = False,
    startup_timeout: float = 60.0,
    lease_seconds: float = 5.0,
) -> Iterator[Server]:
    """``centroid serve`` (and optionally a ``centroid worker``) as subprocesses; stopped with SIGTERM.

    The job lease is short (``lease_seconds``, the default is 60 s): a job whose worker was killed
    is taken over that long after the worker's last heartbeat, so the drain after a kill is quick."""
    port = free_port()
    data_dir = work_dir / "data"
    env = {
        **os.environ,
        "CENTROID_DATA_DIR": str(data_dir),
        "CENTROID_LOG_LEVEL": "WARNING",
        "CENTROID_LOG_FORMAT": "text",
        "CENTROID_WORKER_POLL_INTERVAL": "0.2",
        "CENTROID_LEASE_SECONDS": str(lease_seconds),
    }
    env.pop("CENTROID_DATABASE_URL", None)
    env.pop("DATABASE_URL", None)
    if database_url:
        env["CENTROID_DATABASE_URL"] = database_url
    server = Server(f"http://127.0.0.1:{port}", data_dir, work_dir, env)
    try:
        no_worker = ["--no-worker"] if separate_worker else []
        server.start(["serve", "--host", "127.0.0.1", "--port", str(port), *no_worker])
        _wait_ready(server, startup_timeout)
        if separate_worker:
            server.start(["worker"])
        yield server
    finally:
        for process in reversed(server.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in server.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.processes[0].poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"centroid serve did not become ready:\n{server.log_text()[-4000:]}")
        time.sleep(0.1)


# --- payloads -------------------------------------------------------------------------------------


def blobs_csv(rows: int, seed: int, prefix: str = "r") -> bytes:
    rng = np.random.default_rng(seed)
    points = CENTERS[rng.integers(0, len(CENTERS), rows)] + rng.normal(scale=0.5, size=(rows, FEATURES))
    buffer = io.StringIO()
    buffer.write("id,x,y\n")
    for i, (x, y) in enumerate(points):
        buffer.write(f"{prefix}{i},{x:.6f},{y:.6f}\n")
    return buffer.getvalue().encode()


def invocation_rows(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return CENTERS[rng.integers(0, len(CENTERS), INVOKE_ROWS)] + rng.normal(scale=0.5, size=(INVOKE_ROWS, FEATURES))


def csv_body(rows: np.ndarray) -> bytes:
    return "".join(",".join(f"{v:.6f}" for v in row) + "\n" for row in rows).encode()


def json_body(rows: np.ndarray) -> bytes:
    return json.dumps({"instances": [{"features": [round(float(v), 6) for v in row]} for row in rows]}).encode()


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    values = np.asarray(latencies) * 1000.0
    return {
        "n": len(latencies),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "p99": float(np.percentile(values, 99)),
    }


# --- recording --------------------------------------------------------------------------------------


@dataclass
class Recorder:
    statuses: dict[str, Counter[int | str]] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    async def call(
        self, kind: str, client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
    ) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            response = await client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            self.statuses.setdefault(kind, Counter())[type(exc).__name__] += 1
            self.problems.append(f"{kind} {method} {url}: transport error {type(exc).__name__}: {exc}")
            return None
        elapsed = time.perf_counter() - started
        self.statuses.setdefault(kind, Counter())[response.status_code] += 1
        self.latencies.setdefault(kind, []).append(elapsed)
        if response.status_code not in EXPECTED[kind]:
            self.problems.append(f"{kind} {method} {url}: {response.status_code} {response.text[:300]}")
        return response

    def count(self, predicate: Any) -> int:
        return sum(n for counter in self.statuses.values() for status, n in counter.items() if predicate(status))


# --- phases -----------------------------------------------------------------------------------------


async def _wait_status(client: httpx.AsyncClient, path: str, wanted: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = (await client.get(path)).json()
        if body.get("status") in wanted:
            return body
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not reach {sorted(wanted)} in {timeout:.0f} s: {body}")
        await asyncio.sleep(0.1)


async def prepare(client: httpx.AsyncClient, run_id: str) -> str:
    """Train one model and deploy it on two endpoints; return the training dataset id."""
    response = await client.post(
        "/datasets",
        files={"file": ("train.csv", blobs_csv(TRAIN_ROWS, 0), "text/csv")},
        data={"name": f"{run_id}-train", "key_column": "id"},
    )
    response.raise_for_status()
    dataset_id: str = response.json()["id"]
    job = f"{run_id}-setup"
    body = {"name": job, "train_dataset_id": dataset_id, "hyperparameters": TRAINING}
    (await client.post("/training-jobs", json=body)).raise_for_status()
    done = await _wait_status(client, f"/training-jobs/{job}", {"Completed", "Failed", "Stopped"}, 120)
    if done["status"] != "Completed":
        raise RuntimeError(f"set-up training failed: {done}")
    for endpoint in ("ep-csv", "ep-json"):
        (await client.post("/endpoints", json={"name": endpoint, "model_id": done["model_id"]})).raise_for_status()
    for endpoint in ("ep-csv", "ep-json"):
        await _wait_status(client, f"/endpoints/{endpoint}", {"InService", "Failed"}, 120)
    return dataset_id


async def invoke(recorder: Recorder, client: httpx.AsyncClient, kind: str, seed: int) -> None:
    rows = invocation_rows(seed)
    if kind == "invoke-csv":
        await recorder.call(
            kind,
            client,
            "POST",
            "/endpoints/ep-csv/invocations",
            content=csv_body(rows),
            headers={"content-type": "text/csv"},
        )
    else:
        await recorder.call(
            kind,
            client,
            "POST",
            "/endpoints/ep-json/invocations",
            content=json_body(rows),
            headers={"content-type": "application/json"},
        )


async def baseline(client: httpx.AsyncClient, requests: int) -> Recorder:
    """The same invocations, one at a time, on the idle server."""
    recorder = Recorder()
    for i in range(requests):
        await invoke(recorder, client, "invoke-csv" if i % 2 == 0 else "invoke-json", i)
    return recorder


@dataclass
class Kill:
    """What the worker kill did: when, to which process, and which jobs the killed worker held."""

    requested_at: float  # seconds into the load phase
    target_job: str
    at: float = float("nan")  # when the SIGKILL was sent, seconds into the load phase
    killed_pid: int = 0
    replacement_pid: int = 0
    held: dict[str, dict[str, Any]] = field(default_factory=dict)  # job name -> its view just before the kill
    after_kill: dict[str, dict[str, Any]] = field(default_factory=dict)  # ... and just after
    final: dict[str, dict[str, Any]] = field(default_factory=dict)  # ... and after the drain
    models: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class LoadOutcome:
    recorder: Recorder
    seconds: float
    jobs: list[str]
    datasets: dict[str, int]
    kill: Kill | None = None


async def load(
    client: httpx.AsyncClient,
    run_id: str,
    train_dataset_id: str,
    seconds: float,
    concurrency: int,
    job_interval: float,
    upload_interval: float,
    mixed: bool = True,
    server: Server | None = None,
    kill_worker_at: float | None = None,
) -> LoadOutcome:
    recorder = Recorder()
    jobs: list[str] = []
    datasets: dict[str, int] = {}
    started = time.monotonic()
    deadline = started + seconds
    kill = None if kill_worker_at is None else Kill(kill_worker_at, f"{run_id}-kill-target")

    async def invoker(index: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            await invoke(
                recorder, client, "invoke-csv" if (index + n) % 2 == 0 else "invoke-json", 1000 + index * 100_000 + n
            )
            n += 1

    async def submitter() -> None:
        n = 0
        while time.monotonic() < deadline:
            name = f"{run_id}-job-{n}"
            body = {"name": name, "train_dataset_id": train_dataset_id, "hyperparameters": {**TRAINING, "seed": n}}
            response = await recorder.call("submit-job", client, "POST", "/training-jobs", json=body)
            if response is not None and response.status_code == 202:
                jobs.append(name)
            n += 1
            await asyncio.sleep(job_interval)

    async def uploader() -> None:
        n = 0
        while time.monotonic() < deadline:
            name = f"{run_id}-upload-{n}"
            response = await recorder.call(
                "upload",
                client,
                "POST",
                "/datasets",
                files={"file": (f"{name}.csv", blobs_csv(UPLOAD_ROWS, 10_000 + n, prefix=f"u{n}-"), "text/csv")},
                data={"name": name, "key_column": "id"},
            )
            if response is not None and response.status_code == 201:
                datasets[response.json()["id"]] = UPLOAD_ROWS
            n += 1
            await asyncio.sleep(upload_interval)

    async def reader() -> None:
        n = 0
        while time.monotonic() < deadline:
            rows = [{"id": f"p{i}", "x": float(x), "y": float(y)} for i, (x, y) in enumerate(invocation_rows(n))]
            await recorder.call(
                "predictions",
                client,
                "POST",
                "/endpoints/ep-json/predictions",
                json={"rows": rows, "sort": "cluster,distance"},
            )
            path = ("/datasets?limit=20", "/training-jobs?limit=20", "/endpoints/ep-csv", "/models?limit=20")[n % 4]
            await recorder.call("get", client, "GET", path)
            if jobs:
                await recorder.call("get", client, "GET", f"/training-jobs/{jobs[-1]}")
            n += 1
            await asyncio.sleep(0.02)

    async def killer(kill: Kill, server: Server) -> None:
        """Mid-load: SIGKILL the `centroid worker` while it trains, start a replacement at once."""
        await asyncio.sleep(max(0.0, started + kill.requested_at - time.monotonic()))
        body = {"name": kill.target_job, "train_dataset_id": train_dataset_id, "hyperparameters": KILL_TARGET_TRAINING}
        response = await recorder.call("submit-job", client, "POST", "/training-jobs", json=body)
        if response is not None and response.status_code == 202:
            jobs.append(kill.target_job)
        # Which jobs the worker holds just before the kill: the InProgress ones (one worker, so
        # normally one). Kill as soon as the kill target is among them: mid-training.
        give_up = time.monotonic() + KILL_HOLD_TIMEOUT
        while True:
            response = await recorder.call(
                "get", client, "GET", "/training-jobs", params={"status": "InProgress", "limit": 100}
            )
            held = {} if response is None or response.status_code != 200 else response.json()["items"]
            kill.held = {job["name"]: job for job in held}
            if kill.target_job in kill.held or time.monotonic() > give_up:
                break
            await asyncio.sleep(0.02)
        kill.at = time.monotonic() - started
        kill.killed_pid, kill.replacement_pid = await asyncio.to_thread(server.kill_and_replace_worker)
        for name in kill.held:
            response = await recorder.call("get", client, "GET", f"/training-jobs/{name}")
            if response is not None and response.status_code == 200:
                kill.after_kill[name] = response.json()

    others = [submitter(), uploader(), reader()] if mixed else []
    if mixed and kill is not None:
        assert server is not None, "killing the worker needs the server"
        others.append(killer(kill, server))
    await asyncio.gather(*(invoker(i) for i in range(concurrency)), *others)
    return LoadOutcome(recorder, time.monotonic() - started, jobs, datasets, kill)


async def _all_pages(client: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    offset = 0
    while True:
        response = await client.get(path, params={"offset": offset, "limit": 500})
        response.raise_for_status()
        page = response.json()
        items.extend(page["items"])
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return items


@dataclass
class Verification:
    jobs_final: dict[str, str]
    jobs_lost: list[str]
    model_problems: list[str]
    dataset_problems: list[str]
    drain_seconds: float


async def verify(client: httpx.AsyncClient, outcome: LoadOutcome, drain_timeout: float) -> Verification:
    """Every accepted job final with exactly one model per Completed job; every upload intact."""
    started = time.monotonic()
    pending = set(outcome.jobs)
    final: dict[str, str] = {}
    while pending and time.monotonic() - started < drain_timeout:
        for job in await _all_pages(client, "/training-jobs"):
            if job["name"] in pending and job["status"] in ("Completed", "Failed", "Stopped"):
                final[job["name"]] = job["status"]
                pending.discard(job["name"])
        if pending:
            await asyncio.sleep(0.25)
    drained = time.monotonic() - started

    model_problems: list[str] = []
    models_by_job = Counter(m["training_job_name"] for m in await _all_pages(client, "/models"))
    jobs = {job["name"]: job for job in await _all_pages(client, "/training-jobs")}
    for name, status in final.items():
        if status != "Completed":
            model_problems.append(f"job {name} ended {status}: {jobs[name].get('failure_reason')}")
            continue
        if models_by_job[name] != 1:
            model_problems.append(f"job {name} has {models_by_job[name]} models")
        elif not jobs[name].get("model_id"):
            model_problems.append(f"job {name} is Completed without a model_id")

    dataset_problems: list[str] = []
    listed = {d["id"]: d for d in await _all_pages(client, "/datasets")}
    for dataset_id, rows in outcome.datasets.items():
        if dataset_id not in listed:
            dataset_problems.append(f"dataset {dataset_id} is not listed")
            continue
        detail = await client.get(f"/datasets/{dataset_id}")
        page = await client.get(f"/datasets/{dataset_id}/rows", params={"offset": rows - 1, "limit": 10})
        if detail.status_code != 200 or page.status_code != 200:
            dataset_problems.append(f"dataset {dataset_id} unreadable: {detail.status_code} {page.status_code}")
        elif detail.json()["row_count"] != rows or page.json()["total"] != rows or len(page.json()["rows"]) != 1:
            dataset_problems.append(f"dataset {dataset_id} does not hold its {rows} rows")
    if outcome.kill is not None:
        check_kill(outcome.kill, jobs, models_by_job)
    return Verification(final, sorted(pending), model_problems, dataset_problems, drained)


def check_kill(kill: Kill, jobs: dict[str, dict[str, Any]], models_by_job: Counter[str]) -> None:
    """The jobs the killed worker held were retaken and Completed, once."""
    if not kill.held:
        kill.problems.append(f"the worker held no job when it was killed (waited {KILL_HOLD_TIMEOUT:.0f} s)")
    elif kill.target_job not in kill.held:
        kill.problems.append(f"the kill target {kill.target_job} was not InProgress when the worker was killed")
    for name, before in kill.held.items():
        after = kill.after_kill.get(name, {})
        if after.get("status") != "InProgress" or after.get("attempts") != before["attempts"]:
            kill.problems.append(
                f"job {name} was no longer held when the kill landed: {after.get('status')},"
                f" attempts {after.get('attempts')}"
            )
        kill.final[name] = final = jobs.get(name, {})
        kill.models[name] = models_by_job[name]
        if final.get("status") != "Completed" or models_by_job[name] != 1:
            kill.problems.append(f"job {name} ended {final.get('status')} with {models_by_job[name]} models")
        elif final["attempts"] <= before["attempts"]:
            kill.problems.append(f"job {name} was not retaken after the kill (attempts {final['attempts']})")


# --- the whole run ------------------------------------------------------------------------------------


@dataclass
class Result:
    seconds: float
    concurrency: int
    database: str
    worker: str
    idle: dict[str, dict[str, float]]
    solo: dict[str, dict[str, float]]
    loaded: dict[str, dict[str, float]]
    statuses: dict[str, dict[str, int]]
    throughput: dict[str, float]
    server_5xx: int
    transport_errors: int
    unexpected: list[str]
    jobs_accepted: int
    jobs_final: dict[str, int]
    jobs_lost: list[str]
    model_problems: list[str]
    datasets_uploaded: int
    dataset_problems: list[str]
    drain_seconds: float
    log_findings: list[str]
    kill: Kill | None = None

    @property
    def ok(self) -> bool:
        return not (
            self.server_5xx
            or self.transport_errors
            or self.unexpected
            or self.jobs_lost
            or self.model_problems
            or self.dataset_problems
            or self.log_findings
            or (self.kill is not None and self.kill.problems)
        )

    def ratio(self, kind: str, stat: str, baseline: str = "idle") -> float:
        return self.loaded[kind][stat] / getattr(self, baseline)[kind][stat]


async def _run(
    server: Server,
    seconds: float,
    concurrency: int,
    baseline_requests: int,
    baseline_seconds: float,
    drain_timeout: float,
    job_interval: float,
    upload_interval: float,
    kill_worker_at: float | None,
) -> tuple[Recorder, LoadOutcome, LoadOutcome, Verification]:
    run_id = f"load{int(time.time())}"
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(60.0), limits=limits) as client:
        train_id = await prepare(client, run_id)
        await baseline(client, 20)  # warm-up: model caches, connection pool
        idle = await baseline(client, baseline_requests)
        solo = await load(
            client, run_id, train_id, baseline_seconds, concurrency, job_interval, upload_interval, mixed=False
        )
        outcome = await load(
            client,
            run_id,
            train_id,
            seconds,
            concurrency,
            job_interval,
            upload_interval,
            server=server,
            kill_worker_at=kill_worker_at,
        )
        verification = await verify(client, outcome, drain_timeout)
    return idle, solo, outcome, verification


def run(
    seconds: float = 60.0,
    concurrency: int = 8,
    database_url: str | None = None,
    separate_worker: bool = False,
    baseline_requests: int = 200,
    baseline_seconds: float = 10.0,
    drain_timeout: float = 180.0,
    job_interval: float = 0.5,
    upload_interval: float = 0.5,
    work_dir: Path | None = None,
    kill_worker_at: float | None = None,
    lease_seconds: float = 5.0,
) -> Result:
    if kill_worker_at is not None and not separate_worker:
        raise ValueError("kill_worker_at needs separate_worker: the embedded worker is the API process")
    if kill_worker_at is not None and not 0 <= kill_worker_at < seconds:
        raise ValueError(f"kill_worker_at must be within the load phase (0 to {seconds} s), not {kill_worker_at}")
    with tempfile.TemporaryDirectory(prefix="centroid-load-") as scratch:
        directory = work_dir or Path(scratch)
        with centroid_server(directory, database_url, separate_worker, lease_seconds=lease_seconds) as server:
            idle, solo, outcome, verification = asyncio.run(
                _run(
                    server,
                    seconds,
                    concurrency,
                    baseline_requests,
                    baseline_seconds,
                    drain_timeout,
                    job_interval,
                    upload_interval,
                    kill_worker_at,
                )
            )
            alive = {
                f"`centroid {server.commands[i][0]}` (pid {process.pid})": process.poll() is None
                for i, process in enumerate(server.processes)
                if i not in server.killed
            }
        log = server.log_text()
    findings = [f"{needle!r} in the server log" for needle in ("database is locked", "Traceback") if needle in log]
    findings += [f"{name} died during the run" for name, up in alive.items() if not up]
    recorder = outcome.recorder
    kinds = ("invoke-csv", "invoke-json")
    invocations = sum(len(recorder.latencies.get(kind, [])) for kind in kinds)
    requests = recorder.count(lambda status: isinstance(status, int))
    return Result(
        seconds=outcome.seconds,
        concurrency=concurrency,
        database=(database_url or "sqlite").split(":")[0],
        worker=("separate `centroid worker`" if separate_worker else "embedded")
        + ("" if kill_worker_at is None else f", SIGKILLed at {kill_worker_at:g} s and replaced"),
        idle={kind: percentiles(idle.latencies.get(kind, [])) for kind in kinds},
        solo={kind: percentiles(solo.recorder.latencies.get(kind, [])) for kind in kinds},
        loaded={kind: percentiles(recorder.latencies.get(kind, [])) for kind in kinds},
        statuses={kind: {str(s): n for s, n in sorted(c.items(), key=str)} for kind, c in recorder.statuses.items()},
        throughput={
            "invocations_per_s": invocations / outcome.seconds,
            "requests_per_s": requests / outcome.seconds,
            "solo_invocations_per_s": sum(len(solo.recorder.latencies.get(k, [])) for k in kinds) / solo.seconds,
        },
        server_5xx=sum(r.count(lambda s: isinstance(s, int) and s >= 500) for r in (idle, solo.recorder, recorder)),
        transport_errors=sum(r.count(lambda s: isinstance(s, str)) for r in (idle, solo.recorder, recorder)),
        unexpected=idle.problems + solo.recorder.problems + recorder.problems,
        jobs_accepted=len(outcome.jobs),
        jobs_final=dict(Counter(verification.jobs_final.values())),
        jobs_lost=verification.jobs_lost,
        model_problems=verification.model_problems,
        datasets_uploaded=len(outcome.datasets),
        dataset_problems=verification.dataset_problems,
        drain_seconds=verification.drain_seconds,
        log_findings=findings,
        kill=outcome.kill,
    )


def report(result: Result) -> str:
    lines = [
        f"Centroid load test: {result.seconds:.1f} s, {result.concurrency} invokers + 1 job submitter + 1 uploader"
        f" + 1 reader; database {result.database}, worker {result.worker}",
        "",
        "invocation latency (ms)      n     p50     p95     p99",
    ]
    for kind in result.idle:
        for label, stats in (
            ("idle ", result.idle[kind]),
            ("solo ", result.solo[kind]),
            ("load ", result.loaded[kind]),
        ):
            lines.append(
                f"  {label}{kind:<14} {stats['n']:>7} {stats['p50']:>7.1f} {stats['p95']:>7.1f} {stats['p99']:>7.1f}"
            )
    lines.append("  (idle: one request at a time; solo: the same invokers with nothing else running; load: the mix)")
    for baseline, label in (("idle", "idle server"), ("solo", "invocations only, same concurrency")):
        lines.append("")
        lines.append(f"ratio under load / baseline '{baseline}' ({label}; same process, same payloads):")
        for kind in result.idle:
            lines.append(
                f"  {kind:<12} p50 x{result.ratio(kind, 'p50', baseline):.2f}"
                f"  p95 x{result.ratio(kind, 'p95', baseline):.2f}"
                f"  p99 x{result.ratio(kind, 'p99', baseline):.2f}"
            )
    lines += [
        "",
        f"throughput: {result.throughput['invocations_per_s']:.1f} invocations/s,"
        f" {result.throughput['requests_per_s']:.1f} requests/s (all kinds); invocations only:"
        f" {result.throughput['solo_invocations_per_s']:.1f} invocations/s",
        "status counts: " + "; ".join(f"{kind} {counts}" for kind, counts in result.statuses.items()),
        f"5xx: {result.server_5xx}   transport errors: {result.transport_errors}"
        f"   unexpected responses: {len(result.unexpected)}",
        f"jobs: {result.jobs_accepted} accepted, final {result.jobs_final}, lost {len(result.jobs_lost)}"
        f" (drained in {result.drain_seconds:.1f} s); model problems: {len(result.model_problems)}",
        f"datasets: {result.datasets_uploaded} uploaded, problems: {len(result.dataset_problems)}",
        *kill_report(result.kill),
        f"server log: {', '.join(result.log_findings) or 'clean'}",
    ]
    for problem in [
        *result.unexpected[:10],
        *result.jobs_lost[:10],
        *result.model_problems[:10],
        *result.dataset_problems[:10],
        *(result.kill.problems if result.kill else []),
    ]:
        lines.append(f"  ! {problem}")
    lines.append(f"RESULT: {'PASS' if result.ok else 'FAIL'}")
    return "\n".join(lines)


def kill_report(kill: Kill | None) -> list[str]:
    if kill is None:
        return []
    lines = [
        f"worker kill: SIGKILL to `centroid worker` pid {kill.killed_pid} at {kill.at:.1f} s into the load"
        f" (asked: {kill.requested_at:g} s); replacement pid {kill.replacement_pid} started at once"
    ]
    if not kill.held:
        lines.append("  it held no job")
    for name, before in kill.held.items():
        after, final = kill.after_kill.get(name, {}), kill.final.get(name, {})
        progress = before["progress"]
        lines.append(
            f"  it held {name}: {before['status']}, attempt {before['attempts']},"
            f" {progress['points_processed']}/{progress['points_total']} points, {before.get('status_message')};"
            f" just after the kill: {after.get('status')}"
        )
        lines.append(
            f"  afterwards: {name} {final.get('status')} (attempts {final.get('attempts')},"
            f" {kill.models.get(name, 0)} model, {final.get('training_seconds')} s of training)"
        )
    lines.append(f"kill problems: {len(kill.problems)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load phase (default 60)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent invokers (default 8)")
    parser.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: SQLite in a temp dir)")
    parser.add_argument("--separate-worker", action="store_true", help="serve --no-worker plus a `centroid worker`")
    parser.add_argument("--baseline-requests", type=int, default=200, help="idle invocations for the idle baseline")
    parser.add_argument(
        "--baseline-seconds", type=float, default=10.0, help="length of the invocations-only baseline (default 10)"
    )
    parser.add_argument("--drain-seconds", type=float, default=180.0, help="bound on the wait for jobs to finish")
    parser.add_argument("--job-interval", type=float, default=0.5, help="seconds between job submissions")
    parser.add_argument("--upload-interval", type=float, default=0.5, help="seconds between dataset uploads")
    parser.add_argument(
        "--kill-worker-at",
        type=float,
        default=None,
        metavar="SECONDS",
        help="this long into the load phase, SIGKILL the `centroid worker` mid-training and start a replacement"
        " (needs --separate-worker)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=5.0,
        help="the servers' CENTROID_LEASE_SECONDS: how soon a killed worker's job is retaken (default 5)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.kill_worker_at is not None:
        if not args.separate_worker:
            parser.error("--kill-worker-at needs --separate-worker (the embedded worker is the API process itself)")
        if not 0 <= args.kill_worker_at < args.seconds:
            parser.error(f"--kill-worker-at must be within the load phase: 0 <= SECONDS < --seconds ({args.seconds:g})")
    result = run(
        seconds=args.seconds,
        concurrency=args.concurrency,
        database_url=args.database_url,
        separate_worker=args.separate_worker,
        baseline_requests=args.baseline_requests,
        baseline_seconds=args.baseline_seconds,
        drain_timeout=args.drain_seconds,
        job_interval=args.job_interval,
        upload_interval=args.upload_interval,
        kill_worker_at=args.kill_worker_at,
        lease_seconds=args.lease_seconds,
    )
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(result), indent=2, default=str))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
