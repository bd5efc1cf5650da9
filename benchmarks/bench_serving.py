"""Serving benchmark: Centroid's hot paths under wrk, next to their ceiling, in the same run.

    python benchmarks/bench_serving.py                          # SQLite, 5 s per wrk run, 3 repeats
    python benchmarks/bench_serving.py --seconds 3 --repeat 1   # quick
    python benchmarks/bench_serving.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    python benchmarks/bench_serving.py --workers 4              # also a run with `centroid serve --workers 4`

The load generator is wrk (Debian/Ubuntu: ``apt-get install wrk``).

Two servers run side by side on free ports of 127.0.0.1:

* **bare**: ``benchmarks/bare_app.py`` under the same uvicorn, one process: FastAPI with Centroid's
  routes and a small constant JSON answer, nothing else. It is the ceiling: what this machine, this
  Python, FastAPI and uvicorn give for these requests before Centroid does any work.
* **Centroid**: ``centroid serve`` on a fresh data directory (SQLite, or a fresh PostgreSQL database
  with ``--postgres``), JSON logs written to a file, metrics on, API keys configured; every request
  carries ``Authorization: Bearer <key>``.

On Centroid the workshop is set up over HTTP as in the README (upload, scale, join, select), then
timed: training job → Completed → endpoint ``crime`` InService → 50 predictions, one per state
("workshop seconds"). Then each scenario runs ``wrk -t1 -c16 -d<seconds>s`` against both servers,
alternating, ``--repeat`` times: invocations with one CSV row, invocations with one JSON row,
predictions with one raw row, the trained model's assignments (50 states), ``/healthz``. Last, one
request of 10,000 CSV rows is sent 30 times in a row (after 3 warm-ups) with httpx.

A wrk Lua ``response()`` counts every non-2xx answer and ``done()`` prints one JSON line per run
(requests, duration, errors, p50/p99). The exit status is 1 if any request failed (non-2xx, socket
error or timeout) or Centroid's answers disagree with each other: a benchmark with errors is not a
result.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "service" / "sample_data"
WRK_INSTALL = "apt-get install wrk"
FEATURES = ["Murder", "Assault", "UrbanPop", "Rape", "DensityPerMile"]
ENDPOINT = "crime"
JOB = "crime-k10"
BIG_ROWS = 10_000
BIG_WARMUPS = 3
BIG_REQUESTS = 30
WORKSHOP_PREDICTIONS = 50
HTTP_TIMEOUT = 120.0
RESULT_MARK = "@@bench "


# --- scenarios ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    method: str
    path: str  # may contain {model_id}
    content_type: str | None = None
    body: str | None = None


SCENARIOS: list[Scenario] = [
    Scenario(
        "invocations-csv",
        "invocations, 1 `text/csv` row",
        "POST",
        f"/endpoints/{ENDPOINT}/invocations",
        "text/csv",
        "13.2,236,58,21.2,-0.855\n",
    ),
    Scenario(
        "invocations-json",
        "invocations, 1 `application/json` row",
        "POST",
        f"/endpoints/{ENDPOINT}/invocations",
        "application/json",
        json.dumps({"instances": [{"features": [13.2, 236, 58, 21.2, -0.855]}]}),
    ),
    Scenario(
        "predictions-raw",
        "predictions, 1 raw row (JSON)",
        "POST",
        f"/endpoints/{ENDPOINT}/predictions",
        "application/json",
        json.dumps(
            {
                "rows": [
                    {
                        "State": "Alabama",
                        "Murder": 13.2,
                        "Assault": 236,
                        "UrbanPop": 58,
                        "Rape": 21.2,
                        "DensityPerMile": 71.3,
                    }
                ],
                "raw": True,
            }
        ),
    ),
    Scenario("assignments", "`GET /models/{id}/assignments` (50 states)", "GET", "/models/{model_id}/assignments"),
    Scenario("healthz", "`GET /healthz`", "GET", "/healthz"),
]
BIG_SCENARIO = "csv-10k"
SCENARIO_NAMES = [scenario.name for scenario in SCENARIOS] + [BIG_SCENARIO]


# --- results --------------------------------------------------------------------------------------


@dataclass
class WrkRun:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    non_2xx: int
    statuses: dict[str, int]

    @property
    def errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts + self.non_2xx


@dataclass
class BigResult:
    ms: list[float]
    rows: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)

    @property
    def rows_per_s(self) -> float:
        return self.rows / (self.median_ms / 1000.0)


@dataclass
class Configuration:
    name: str
    database: str
    workers: int | None
    workshop: dict[str, float] = field(default_factory=dict)
    runs: dict[str, dict[str, list[WrkRun]]] = field(default_factory=dict)  # scenario -> server -> runs
    big: dict[str, BigResult] = field(default_factory=dict)  # server -> result
    log_lines: int = 0  # lines Centroid logged during the run (JSON access logs): the logging cost was paid
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(
    name: str, command: list[str], env: dict[str, str], log_path: Path, url: str, ready_path: str, timeout: float
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server in its own process group, wait until ``ready_path`` answers 200, and always stop
    the whole group (uvicorn's worker processes included): SIGTERM, then SIGKILL after 15 s."""
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                state = f"exited with {process.returncode}" if process.poll() is not None else "timed out"
                raise RuntimeError(f"{name} did not become ready ({state}); its log ends with:\n{tail}")
            time.sleep(0.1)
        yield process
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, SIGKILL if the leader is still there after 15 s; then SIGKILL whatever
    of the group is left (a worker process that outlived its parent)."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def serve_supports_workers() -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--help"], cwd=REPO, capture_output=True, text=True, check=False
    )
    return "--workers" in result.stdout


# --- PostgreSQL -----------------------------------------------------------------------------------


@contextmanager
def fresh_postgres_database(admin_url: str) -> Iterator[str]:
    """A new database ``centroid_bench_<random>`` on the server of ``admin_url``; dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"centroid_bench_{secrets.token_hex(4)}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with engine.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        engine.dispose()


# --- API keys -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    read: str
    admin: str
    config: str  # the CENTROID_API_KEYS value


def make_keys() -> Keys:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from service.auth import generate_key, hash_key

    read, admin = generate_key(), generate_key()
    entries = [
        {"name": "bench-read", "scope": "read", "sha256": hash_key(read)},
        {"name": "bench-admin", "scope": "admin", "sha256": hash_key(admin)},
    ]
    return Keys(read, admin, json.dumps(entries))


def centroid_env(data_dir: Path, keys: Keys, database_url: str | None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CENTROID_")}
    env.pop("DATABASE_URL", None)
    env.update(
        {
            "CENTROID_DATA_DIR": str(data_dir),
            "CENTROID_LOG_FORMAT": "json",
            "CENTROID_API_KEYS": keys.config,
        }
    )
    if database_url:
        env["CENTROID_DATABASE_URL"] = database_url
    return env


# --- the workshop over HTTP -----------------------------------------------------------------------


def expect(response: httpx.Response, *statuses: int) -> Any:
    if response.status_code not in statuses:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} answered {response.status_code}: "
            f"{response.text[:500]}"
        )
    return response.json() if response.content else None


def wait_for(client: httpx.Client, path: str, wanted: str, failed: set[str], timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = expect(client.get(path), 200)
        if body["status"] == wanted:
            return body
        if body["status"] in failed:
            raise RuntimeError(f"{path} is {body['status']}: {body.get('failure_reason')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} still {body['status']} after {timeout:.0f} s")
        time.sleep(0.05)


def raw_state_rows() -> list[dict[str, Any]]:
    """The 50 states in original units, from the sample files (the rows the workshop predicts)."""
    with open(SAMPLE_DATA / "densities.csv", newline="") as file:
        density = {row["State"]: float(row["DensityPerMile"]) for row in csv.DictReader(file)}
    rows: list[dict[str, Any]] = []
    with open(SAMPLE_DATA / "crimes.csv", newline="") as file:
        for row in csv.DictReader(file):
            if row["State"] in density:
                rows.append(
                    {"State": row["State"], **{name: float(row[name]) for name in FEATURES[:-1]}}
                    | {"DensityPerMile": density[row["State"]]}
                )
    return rows


def set_up_workshop(url: str, keys: Keys, configuration: Configuration) -> str:
    """README's two walk-throughs over HTTP; returns the model id. Times training → serving → 50 predictions."""
    with (
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys.admin}"}, timeout=HTTP_TIMEOUT) as admin,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys.read}"}, timeout=HTTP_TIMEOUT) as reader,
    ):
        ids: dict[str, str] = {}
        for name in ("crimes", "densities"):
            with open(SAMPLE_DATA / f"{name}.csv", "rb") as file:
                response = admin.post(
                    "/datasets",
                    files={"file": (f"{name}.csv", file, "text/csv")},
                    data={"name": name, "key_column": "State"},
                )
            ids[name] = expect(response, 201)["id"]
        scaled = {
            "name": "densities-scaled",
            "steps": [{"op": "scale", "columns": ["DensityPerMile"], "method": "minmax", "feature_range": [-1, 1]}],
        }
        ids["scaled"] = expect(admin.post(f"/datasets/{ids['densities']}/derive", json=scaled), 201)["id"]
        workshop = {
            "name": "workshop",
            "steps": [
                {"op": "join", "dataset_id": ids["scaled"], "how": "inner"},
                {"op": "select", "columns": FEATURES},
            ],
        }
        ids["workshop"] = expect(admin.post(f"/datasets/{ids['crimes']}/derive", json=workshop), 201)["id"]
        states = raw_state_rows()

        started = time.perf_counter()
        job = {
            "name": JOB,
            "train_dataset_id": ids["workshop"],
            "hyperparameters": {"k": 10, "init_method": "kmeans++", "seed": 7},
        }
        expect(admin.post("/training-jobs", json=job), 202)
        model_id: str = wait_for(admin, f"/training-jobs/{JOB}", "Completed", {"Failed", "Stopped"})["model_id"]
        trained = time.perf_counter()
        expect(admin.post("/endpoints", json={"name": ENDPOINT, "model_id": model_id}), 202)
        wait_for(admin, f"/endpoints/{ENDPOINT}", "InService", {"Failed"})
        in_service = time.perf_counter()
        predicted: dict[str, int] = {}
        for row in states[:WORKSHOP_PREDICTIONS]:
            answer = expect(reader.post(f"/endpoints/{ENDPOINT}/predictions", json={"rows": [row], "raw": True}), 200)
            predicted[row["State"]] = answer["predictions"][0]["closest_cluster"]
        finished = time.perf_counter()
        configuration.workshop = {
            "seconds": finished - started,
            "train_seconds": trained - started,
            "deploy_seconds": in_service - trained,
            "predictions_seconds": finished - in_service,
        }

        assigned = expect(reader.get(f"/models/{model_id}/assignments"), 200)["clusters"]
        wrong = sorted(state for state, cluster in predicted.items() if assigned.get(state) != cluster)
        if len(predicted) != WORKSHOP_PREDICTIONS or wrong:
            configuration.problems.append(
                f"workshop predictions disagree with the model's assignments for {len(wrong)} states: {wrong[:5]}"
            )
        return model_id


# --- load generation ------------------------------------------------------------------------------


def lua_string(text: str) -> str:
    """A Lua string literal; every byte outside printable ASCII (and quote, backslash) as a 3-digit escape."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}" for b in text.encode()) + '"'


LUA_REPORT = r"""
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  non2xx = 0
  statuses = {}
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    local code = tostring(status)
    statuses[code] = (statuses[code] or 0) + 1
  end
end

function done(summary, latency, requests)
  local non2xx_total = 0
  local codes = {}
  for _, thread in ipairs(threads) do
    non2xx_total = non2xx_total + (thread:get("non2xx") or 0)
    for code, count in pairs(thread:get("statuses") or {}) do
      codes[code] = (codes[code] or 0) + count
    end
  end
  local parts = {}
  for code, count in pairs(codes) do
    table.insert(parts, string.format('"%s": %.0f', code, count))
  end
  local e = summary.errors
  io.write(string.format(
    '@@bench {"requests": %.0f, "duration_us": %.0f, "connect": %.0f, "read": %.0f, "write": %.0f, ' ..
    '"status": %.0f, "timeout": %.0f, "non2xx": %.0f, "p50_us": %.3f, "p99_us": %.3f, "statuses": {%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout, non2xx_total,
    latency:percentile(50), latency:percentile(99), table.concat(parts, ", ")))
end
"""


def write_lua(directory: Path, scenario: Scenario) -> Path:
    lines = [f"wrk.method = {lua_string(scenario.method)}"]
    if scenario.body is not None:
        lines.append(f"wrk.body = {lua_string(scenario.body)}")
    if scenario.content_type is not None:
        lines.append(f'wrk.headers["Content-Type"] = {lua_string(scenario.content_type)}')
    path = directory / f"{scenario.name}.lua"
    path.write_text("\n".join(lines) + "\n" + LUA_REPORT)
    return path


def run_wrk(url: str, script: Path, key: str, seconds: int, connections: int, timeout: int) -> WrkRun:
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={timeout}s",
        "-s",
        str(script),
        "-H",
        f"Authorization: Bearer {key}",
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=seconds + timeout + 60)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if result.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"wrk failed ({result.returncode}) on {url}:\n{result.stdout}\n{result.stderr}")
    raw = json.loads(lines[0][len(RESULT_MARK) :])
    duration = raw["duration_us"] / 1e6
    return WrkRun(
        requests=int(raw["requests"]),
        duration_s=duration,
        rps=raw["requests"] / duration if duration else 0.0,
        p50_ms=raw["p50_us"] / 1000.0,
        p99_ms=raw["p99_us"] / 1000.0,
        connect_errors=int(raw["connect"]),
        read_errors=int(raw["read"]),
        write_errors=int(raw["write"]),
        timeouts=int(raw["timeout"]),
        non_2xx=int(raw["non2xx"]),
        statuses={code: int(count) for code, count in raw["statuses"].items()},
    )


def check_once(url: str, key: str, scenario: Scenario, model_id: str) -> httpx.Response:
    """One request of the scenario with httpx: it must be a 2xx before wrk hammers it."""
    headers = {"Authorization": f"Bearer {key}"}
    if scenario.content_type:
        headers["Content-Type"] = scenario.content_type
    response = httpx.request(
        scenario.method,
        url + scenario.path.format(model_id=model_id),
        content=scenario.body,
        headers=headers,
        timeout=HTTP_TIMEOUT,
    )
    if not 200 <= response.status_code < 300:
        raise RuntimeError(f"{scenario.name} on {url} answered {response.status_code}: {response.text[:500]}")
    return response


def check_centroid_answers(url: str, key: str, model_id: str, configuration: Configuration) -> None:
    """Alabama gets the same cluster from invocations (CSV, JSON), predictions and assignments."""
    by_name = {scenario.name: scenario for scenario in SCENARIOS}

    def first_cluster(name: str) -> int:
        return int(check_once(url, key, by_name[name], model_id).json()["predictions"][0]["closest_cluster"])

    clusters = {name: first_cluster(name) for name in ("invocations-csv", "invocations-json", "predictions-raw")}
    clusters["assignments"] = int(check_once(url, key, by_name["assignments"], model_id).json()["clusters"]["Alabama"])
    if len(set(clusters.values())) != 1:
        configuration.problems.append(f"Alabama's cluster differs between requests: {clusters}")


def big_csv_body(rows: int, seed: int = 0) -> bytes:
    """``rows`` rows of the workshop's five features, uniform over realistic ranges (density already scaled)."""
    rng = np.random.default_rng(seed)
    low = np.array([0.5, 40.0, 30.0, 5.0, -1.0])
    high = np.array([18.0, 340.0, 95.0, 47.0, 1.0])
    values = rng.uniform(low, high, size=(rows, len(low)))
    return "".join(f"{m:.1f},{a:.0f},{u:.0f},{r:.1f},{d:.4f}\n" for m, a, u, r, d in values).encode()


def run_big(url: str, key: str, body: bytes, check_rows: bool) -> BigResult:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "text/csv"}
    timings: list[float] = []
    with httpx.Client(base_url=url, headers=headers, timeout=HTTP_TIMEOUT) as client:
        for index in range(BIG_WARMUPS + BIG_REQUESTS):
            started = time.perf_counter()
            response = client.post(f"/endpoints/{ENDPOINT}/invocations", content=body)
            elapsed = time.perf_counter() - started
            if not 200 <= response.status_code < 300:
                raise RuntimeError(
                    f"{BIG_ROWS}-row invocation on {url} answered {response.status_code}: {response.text[:300]}"
                )
            if check_rows and index == 0 and len(response.json()["predictions"]) != BIG_ROWS:
                raise RuntimeError(f"{BIG_ROWS}-row invocation on {url} did not return {BIG_ROWS} predictions")
            if index >= BIG_WARMUPS:
                timings.append(elapsed * 1000.0)
    return BigResult(timings, BIG_ROWS)


# --- one configuration ----------------------------------------------------------------------------


def run_configuration(
    configuration: Configuration,
    args: argparse.Namespace,
    bare_url: str,
    work_dir: Path,
    scripts: dict[str, Path],
    keys: Keys,
) -> None:
    slug = configuration.name.replace(" ", "-").replace(",", "")
    data_dir = work_dir / f"data-{slug}"
    with ExitStack() as stack:
        database_url = stack.enter_context(fresh_postgres_database(args.postgres)) if args.postgres else None
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if configuration.workers is not None:
            command += ["--workers", str(configuration.workers)]
        log_path = work_dir / f"centroid-{slug}.log"
        print(f"\n## {configuration.name}\n\nstarting centroid {' '.join(command[3:])} (log: {log_path})", flush=True)
        stack.enter_context(
            server_process(
                "centroid serve", command, centroid_env(data_dir, keys, database_url), log_path, url, "/readyz", 120.0
            )
        )

        model_id = set_up_workshop(url, keys, configuration)
        print(f"workshop: {configuration.workshop['seconds']:.2f} s", flush=True)
        check_centroid_answers(url, keys.read, model_id, configuration)

        chosen = [scenario for scenario in SCENARIOS if scenario.name in args.scenarios]
        targets = {"bare": bare_url, "centroid": url}
        for scenario in chosen:
            path = scenario.path.format(model_id=model_id)
            for server, base in targets.items():
                check_once(base, keys.read, scenario, model_id)
                if args.warmup > 0:
                    warmup = run_wrk(
                        base + path, scripts[scenario.name], keys.read, args.warmup, args.connections, args.timeout
                    )
                    if warmup.errors:
                        configuration.problems.append(
                            f"{warmup.errors} failed requests in {scenario.name}'s warm-up "
                            f"on {server}: {warmup.statuses}"
                        )
            configuration.runs[scenario.name] = {"bare": [], "centroid": []}
        for repeat in range(args.repeat):
            order = ["bare", "centroid"] if repeat % 2 == 0 else ["centroid", "bare"]
            for scenario in chosen:
                path = scenario.path.format(model_id=model_id)
                for server in order:
                    run = run_wrk(
                        targets[server] + path,
                        scripts[scenario.name],
                        keys.read,
                        args.seconds,
                        args.connections,
                        args.timeout,
                    )
                    configuration.runs[scenario.name][server].append(run)
                    print(
                        f"  [{repeat + 1}/{args.repeat}] {scenario.name:<17} {server:<8} {run.rps:>9,.0f} req/s"
                        f"  p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms  errors {run.errors}",
                        flush=True,
                    )

        if BIG_SCENARIO in args.scenarios:
            body = big_csv_body(BIG_ROWS)
            for server in ("bare", "centroid"):
                configuration.big[server] = run_big(targets[server], keys.read, body, check_rows=server == "centroid")
                print(f"  {BIG_SCENARIO} {server:<8} median {configuration.big[server].median_ms:.1f} ms", flush=True)

        with open(log_path, "rb") as log_file:
            configuration.log_lines = sum(1 for _ in log_file)


# --- report ---------------------------------------------------------------------------------------


def rps_cell(runs: list[WrkRun]) -> str:
    values = [run.rps for run in runs]
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def error_cell(runs: list[WrkRun]) -> str:
    total = sum(run.errors for run in runs)
    if not total:
        return "0"
    statuses: dict[str, int] = {}
    for run in runs:
        for code, count in run.statuses.items():
            statuses[code] = statuses.get(code, 0) + count
    details = [f"HTTP {code}: {count}" for code, count in sorted(statuses.items())]
    sockets = sum(run.connect_errors + run.read_errors + run.write_errors for run in runs)
    timeouts = sum(run.timeouts for run in runs)
    details += [f"socket: {sockets}"] * bool(sockets) + [f"timeout: {timeouts}"] * bool(timeouts)
    return f"**{total}** ({', '.join(details)})"


def report(configuration: Configuration, args: argparse.Namespace) -> str:
    lines = [f"### {configuration.name}", ""]
    if configuration.skipped:
        return "\n".join([*lines, f"Skipped: {configuration.skipped}", ""])
    lines += [
        f"wrk -t1 -c{args.connections} -d{args.seconds}s, {args.repeat} run(s) per server, alternating; "
        "rps as median (min–max); p50/p99 are medians over the runs.",
        "",
        "| request | bare rps (median, min–max) | Centroid rps (median, min–max) | ratio of medians "
        "| Centroid p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    labels = {scenario.name: scenario.label for scenario in SCENARIOS}
    for name, servers in configuration.runs.items():
        bare, centroid = servers["bare"], servers["centroid"]
        if not bare or not centroid:
            continue
        ratio = statistics.median(run.rps for run in centroid) / statistics.median(run.rps for run in bare)
        p50 = statistics.median(run.p50_ms for run in centroid)
        p99 = statistics.median(run.p99_ms for run in centroid)
        lines.append(
            f"| {labels[name]} | {rps_cell(bare)} | {rps_cell(centroid)} | {ratio:.3f} | {p50:.2f} | {p99:.2f} "
            f"| {error_cell(centroid)} |"
        )
    bare_errors = sum(run.errors for servers in configuration.runs.values() for run in servers["bare"])
    lines.append("")
    if bare_errors:
        lines += [f"**The bare app had {bare_errors} failed requests**: its numbers are not a ceiling.", ""]
    if "centroid" in configuration.big:
        big = configuration.big["centroid"]
        bare_big = configuration.big.get("bare")
        ceiling = f"; bare app {bare_big.median_ms:.1f} ms" if bare_big else ""
        lines += [
            f"{BIG_ROWS:,} `text/csv` rows in one invocation, {BIG_REQUESTS} sequential requests after "
            f"{BIG_WARMUPS} warm-ups: median {big.median_ms:.1f} ms (range {min(big.ms):.1f}–{max(big.ms):.1f} ms), "
            f"{big.rows_per_s:,.0f} rows/s{ceiling}.",
            "",
        ]
    if configuration.workshop:
        w = configuration.workshop
        lines += [
            f"Workshop seconds: {w['seconds']:.2f} (training job → Completed {w['train_seconds']:.2f} s, "
            f"endpoint → InService {w['deploy_seconds']:.2f} s, {WORKSHOP_PREDICTIONS} predictions "
            f"{w['predictions_seconds']:.2f} s).",
            "",
        ]
    if configuration.log_lines:
        lines += [f"Centroid wrote {configuration.log_lines:,} JSON log lines during the run.", ""]
    for problem in configuration.problems:
        lines += [f"**Problem:** {problem}", ""]
    return "\n".join(lines)


def centroid_failures(configuration: Configuration) -> int:
    return sum(run.errors for servers in configuration.runs.values() for run in servers["centroid"])


def machine_info() -> dict[str, Any]:
    import fastapi
    import uvicorn

    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "wrk": (wrk.stdout or wrk.stderr or "?").splitlines()[0].split(" [")[0].strip(),
    }


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="whole seconds per wrk run (default: 5)")
    parser.add_argument("--repeat", type=int, default=3, help="wrk runs per scenario and server (default: 3)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default: 16)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="unrecorded wrk seconds per scenario and server first (default: 1; 0: none)",
    )
    parser.add_argument(
        "--timeout", type=int, default=10, help="wrk's per-request timeout, whole seconds (default: 10)"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIO_NAMES),
        help=f"comma-separated subset of: {', '.join(SCENARIO_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--postgres", metavar="URL", help="use a fresh database on this PostgreSQL server instead of SQLite"
    )
    parser.add_argument(
        "--workers",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="also run `centroid serve --workers N` (repeatable); skipped if serve has no --workers",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the raw results to FILE")
    args = parser.parse_args(argv)
    args.scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = sorted(set(args.scenarios) - set(SCENARIO_NAMES))
    if unknown or not args.scenarios:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIO_NAMES)}")
    if args.repeat < 1 or args.connections < 1 or args.seconds < 1 or args.timeout < 1 or args.warmup < 0:
        parser.error("--repeat, --connections, --seconds and --timeout must be at least 1, --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"Load generator: wrk (Debian/Ubuntu package `wrk`: {WRK_INSTALL}).")
    if shutil.which("wrk") is None:
        print(f"error: wrk is not installed or not on PATH. Install it with: {WRK_INSTALL}", file=sys.stderr)
        return 2
    # Ctrl-C and SIGTERM both unwind through the context managers, which stop every server started here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    info = machine_info()
    print("Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()), flush=True)

    database = "PostgreSQL" if args.postgres else "SQLite"
    configurations = [Configuration(f"{database}, 1 process", database, None)]
    workers_supported = serve_supports_workers() if args.workers else False
    for count in args.workers:
        configuration = Configuration(f"{database}, --workers {count}", database, count)
        if not workers_supported:
            configuration.skipped = "`centroid serve --help` has no --workers option in this checkout; run skipped."
            print(f"note: {configuration.name}: {configuration.skipped}", flush=True)
        configurations.append(configuration)

    keys = make_keys()
    failed = False
    with tempfile.TemporaryDirectory(prefix="centroid-bench-") as tmp, ExitStack() as stack:
        work_dir = Path(tmp)
        scripts = {scenario.name: write_lua(work_dir, scenario) for scenario in SCENARIOS}
        bare_port = free_port()
        bare_url = f"http://127.0.0.1:{bare_port}"
        bare_command = [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.bare_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(bare_port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        stack.enter_context(
            server_process(
                "bare app", bare_command, dict(os.environ), work_dir / "bare.log", bare_url, "/healthz", 60.0
            )
        )
        for configuration in configurations:
            if configuration.skipped:
                continue
            try:
                run_configuration(configuration, args, bare_url, work_dir, scripts, keys)
            except (RuntimeError, httpx.HTTPError, subprocess.SubprocessError) as error:
                configuration.problems.append(f"run aborted: {error}")
                print(f"error: {configuration.name}: {error}", file=sys.stderr, flush=True)

    print()
    for configuration in configurations:
        print(report(configuration, args))
        if centroid_failures(configuration):
            failed = True
            print(f"FAILED: {centroid_failures(configuration)} Centroid requests failed in {configuration.name!r}.")
        if configuration.problems or any(
            run.errors for servers in configuration.runs.values() for run in servers["bare"]
        ):
            failed = True

    if args.json:
        payload = {
            "machine": info,
            "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "configurations": [
                {
                    **{key: value for key, value in asdict(configuration).items() if key not in ("runs", "big")},
                    "runs": {
                        name: {
                            server: [asdict(run) | {"errors": run.errors} for run in runs]
                            for server, runs in servers.items()
                        }
                        for name, servers in configuration.runs.items()
                    },
                    "big": {server: asdict(result) for server, result in configuration.big.items()},
                }
                for configuration in configurations
            ],
            "failed": failed,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"raw results written to {args.json}")
    if failed:
        print("The run had errors: it is not a result.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped.", file=sys.stderr)
        sys.exit(130)
