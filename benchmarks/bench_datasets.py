"""Datasets benchmark: big CSVs through a real ``centroid serve``, next to columnar baselines, in the same run.

    python benchmarks/bench_datasets.py                              # 1M and 10M rows (10M: ~1.5 GB CSV)
    python benchmarks/bench_datasets.py --sizes 1000000              # 1M only, 3 repeats
    python benchmarks/bench_datasets.py --sizes 20000 --repeat 1     # smoke test, a few seconds
    python benchmarks/bench_datasets.py --data-dir /tmp/benchdata --keep-files   # reuse the generated CSVs
    python benchmarks/bench_datasets.py --steps upload,derive --json out.json
    git archive HEAD | tar -x -C /tmp/head && python benchmarks/bench_datasets.py --source /tmp/head   # "before"

For each size N it generates (numpy + ``pyarrow.csv``, in chunks) ``main-N.csv``: a text key ``id``
(``k000000000``...) and 20 float columns ``f00``..``f19`` drawn around 64 centres, and
``extra-N.csv``: the same keys in shuffled order and 3 float columns ``e0``..``e2``. Files are written
to a temporary directory, or to ``--data-dir`` where files of the same name are reused.

One server is started for the whole run: ``.venv/bin/centroid serve`` on a free port of 127.0.0.1,
a fresh temporary data directory (SQLite, embedded worker), JSON logs to a file, the upload caps
(``CENTROID_MAX_UPLOAD_BYTES``, ``CENTROID_MAX_CSV_UPLOAD_BYTES``) raised to 1 TiB, everything else at
its default. Steps, per size (``--steps`` picks a subset); each one is timed from the client, and
during each one a thread samples the resident memory of the server's process tree every 10 ms
(``/proc/<pid>/statm``, the server and every descendant; the peak ``VmHWM`` is reset through
``/proc/<pid>/clear_refs`` first and read after, so a spike between samples is not missed).
"Peak RSS growth" is that peak minus the RSS just before the operation (the larger of the sampled
tree total and any one process's ``VmHWM``):

1. **upload**: ``curl -F file=@main-N.csv -F name=... -F key_column=id $API/datasets`` (curl streams the
   file from disk, as users do), ``--repeat`` times, alternating with the baseline: ``pandas.read_csv``
   of the same file in a fresh subprocess (median). Also a raw body, ``curl -T main-N.csv -X POST
   -H 'Content-Type: text/csv' "$API/datasets?name=...&key_column=id"``; a 415 (or 400/422) means
   "not available" and the step goes on. ``pyarrow.csv.read_csv`` is timed too, as a reference.
   Targets: upload ≤ 2 × pandas at ≤ 1M rows; peak RSS growth ≤ 256 MB.
2. **derive**: ``extra-N.csv`` is uploaded, then ``POST /datasets/{main}/derive`` with
   ``join`` (on ``id``) → ``scale`` (minmax to [-1, 1] of f00..f09, e0..e2) → ``select`` (those 13).
   A 202 answer is followed (``Location``, or ``GET /datasets/{id}``) until done. Baseline: the same
   in one DuckDB statement over the two stored Parquet files (``COPY (WITH j AS (join), m AS
   (min/max) SELECT scaled ...) TO 'x.parquet'``) in a fresh subprocess. Targets: ≤ 2 × DuckDB;
   peak RSS growth ≤ 512 MB.
3. **predictions**: a k = 10 model (``epochs: 1``) is trained once on the smallest size and deployed
   (endpoint ``bench``); then ``POST /endpoints/bench/predictions {"dataset_id": main}`` with
   ``Accept: application/jsonlines`` and again with ``Accept: text/csv``; the answer is read as a stream
   and its lines counted. 406/413/415 mean "not available". Targets: ≥ 1,000,000 rows/s; peak RSS
   growth ≤ 256 MB.
4. **train**: a job with ``k: 64`` (all other hyperparameters SageMaker's defaults) on main-N, until
   ``Completed``; wall time from POST to Completed. Baseline (no direct equivalent: the job also
   reduces k × 10 local centres with Lloyd trials): scikit-learn ``MiniBatchKMeans(k=64, n_init=1,
   batch_size=<the job's mini_batch_size>)`` ``partial_fit`` over the stored Parquet file streamed in
   batches, plus one pass computing the msd, in a fresh subprocess. Targets: completes; peak RSS
   growth (the process that trains: today the embedded worker thread in the API process) ≤ 256 MB.

Every step is independent: an error is printed and recorded and the others go on. The exit status is 1
if any step errored (a target missed or a feature "not available" is a result, not an error). The
server and the temporary directories are removed at exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import numpy as np
from bench_serving import stop_group  # this script's directory is on sys.path

REPO = Path(__file__).resolve().parents[1]
CENTROID_BIN = Path(sys.executable).parent / "centroid"
FEATURES = [f"f{i:02d}" for i in range(20)]
EXTRA = ["e0", "e1", "e2"]
DERIVE_COLUMNS = FEATURES[:10] + EXTRA
CENTERS = 64
KEY = "id"
ENDPOINT = "bench"
HUGE_CAP = str(1 << 40)  # 1 TiB: the upload caps are not what is measured
SAMPLE_SECONDS = 0.01
POLL_SECONDS = 0.1
HTTP_TIMEOUT = httpx.Timeout(60.0, read=3600.0)
LONG_WAIT = 4 * 3600.0
MIB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
ALL_STEPS = ["upload", "derive", "predictions", "train"]
PENDING = {"pending", "inprogress", "in_progress", "running", "creating", "queued", "processing", "accepted"}
FAILED = {"failed", "error", "stopped", "stopping"}
UNAVAILABLE = {400, 404, 405, 406, 413, 415, 422}


# --- results --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    size: int
    what: str
    unit: str  # "s", "MB", "rows/s", ""
    values: list[float] = field(default_factory=list)
    baseline: str = ""
    baseline_values: list[float] = field(default_factory=list)
    target: str = ""  # human-readable
    check: Callable[[Row], bool] | None = None
    status: str = "ok"  # ok | n/a | error | skipped
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def baseline_median(self) -> float | None:
        return statistics.median(self.baseline_values) if self.baseline_values else None

    @property
    def ratio(self) -> float | None:
        if self.median is None or not self.baseline_median:
            return None
        return self.median / self.baseline_median

    @property
    def verdict(self) -> str:
        if self.status != "ok":
            return self.status
        if self.check is None or not self.values:
            return "—"
        try:
            return "pass" if self.check(self) else "**FAIL**"
        except TypeError:  # a ratio without a baseline
            return "—"

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("check")
        data.update(median=self.median, baseline_median=self.baseline_median, ratio=self.ratio, verdict=self.verdict)
        return data


def ratio_at_most(limit: float) -> Callable[[Row], bool]:
    return lambda row: row.ratio is not None and row.ratio <= limit


def value_at_most(limit: float) -> Callable[[Row], bool]:
    return lambda row: row.median is not None and row.median <= limit


def value_at_least(limit: float) -> Callable[[Row], bool]:
    return lambda row: row.median is not None and row.median >= limit


class StepFailed(Exception):
    """A step could not be measured (the message says why)."""


class Unavailable(Exception):
    """The server does not offer this yet (an HTTP answer such as 415, 406 or 413)."""


# --- data -----------------------------------------------------------------------------------------

CHUNK_ROWS = 500_000


def _keys(start: int, stop: int) -> Any:
    return _picked_keys(np.arange(start, stop, dtype=np.int64))


def write_main_csv(path: Path, rows: int, seed: int) -> None:
    """``id`` + f00..f19: points around 64 centres in [-50, 50]^20, normal noise of 5, 3 decimals."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    centres = np.random.default_rng(seed).uniform(-50.0, 50.0, size=(CENTERS, len(FEATURES)))
    schema = pa.schema([(KEY, pa.string())] + [(name, pa.float64()) for name in FEATURES])
    options = pacsv.WriteOptions(quoting_style="needed")
    partial = path.with_name(path.name + ".partial")
    with pacsv.CSVWriter(partial, schema, write_options=options) as writer:
        for start in range(0, rows, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, rows)
            rng = np.random.default_rng([seed, start])
            values = centres[rng.integers(0, CENTERS, stop - start)] + rng.normal(
                0.0, 5.0, (stop - start, len(FEATURES))
            )
            values = np.round(values, 3)
            columns = [_keys(start, stop)] + [pa.array(values[:, i]) for i in range(len(FEATURES))]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    partial.rename(path)


def write_extra_csv(path: Path, rows: int, seed: int) -> None:
    """The same keys in shuffled order, and e0..e2 uniform in [0, 1000), 3 decimals."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    order = np.random.default_rng([seed, 1]).permutation(rows)
    schema = pa.schema([(KEY, pa.string())] + [(name, pa.float64()) for name in EXTRA])
    options = pacsv.WriteOptions(quoting_style="needed")
    partial = path.with_name(path.name + ".partial")
    with pacsv.CSVWriter(partial, schema, write_options=options) as writer:
        for start in range(0, rows, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, rows)
            rng = np.random.default_rng([seed, 2, start])
            picked = order[start:stop]
            keys = _picked_keys(picked)
            values = np.round(rng.uniform(0.0, 1000.0, (stop - start, len(EXTRA))), 3)
            columns = [keys] + [pa.array(values[:, i]) for i in range(len(EXTRA))]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    partial.rename(path)


def _picked_keys(picked: np.ndarray) -> Any:
    """Keys ``k000000042`` for the row numbers ``picked`` (text, so the server keeps them as text)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    numbers = pc.utf8_lpad(pa.array(picked.astype(np.int64)).cast(pa.string()), 9, "0")
    return pc.binary_join_element_wise("k", numbers, "")


@dataclass
class Files:
    main: Path
    extra: Path
    generated: list[Path]


def ensure_files(directory: Path, rows: int, seed: int) -> Files:
    generated: list[Path] = []
    paths = {}
    for kind, writer in (("main", write_main_csv), ("extra", write_extra_csv)):
        path = directory / f"{kind}-{rows}-s{seed}.csv"
        if path.exists():
            print(f"  reusing {path} ({path.stat().st_size / MIB:,.0f} MiB)", flush=True)
        else:
            started = time.perf_counter()
            writer(path, rows, seed)
            generated.append(path)
            print(
                f"  wrote {path} ({path.stat().st_size / MIB:,.0f} MiB) in {time.perf_counter() - started:.1f} s",
                flush=True,
            )
        paths[kind] = path
    return Files(paths["main"], paths["extra"], generated)


# --- memory of the server's process tree ----------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (through /proc/<pid>/task/<tid>/children)."""
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        with suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as file:
                    queue.extend(int(child) for child in file.read().split())
    return pids


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as file:
            return int(file.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def status_field(pid: int, name: str) -> int | None:
    """A ``kB`` line of /proc/<pid>/status, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            parts = [part.decode(errors="replace") for part in file.read().split(b"\0") if part]
    except OSError:
        return "?"
    return " ".join(Path(parts[0]).name if i == 0 else part for i, part in enumerate(parts[:4]))


@dataclass
class MemoryResult:
    baseline_mb: float
    peak_mb: float
    sampled_growth_mb: float  # peak of the tree's summed RSS minus its sum before
    hwm_growth_mb: float | None  # max over processes of VmHWM (reset before) minus RSS before
    samples: int
    processes: dict[str, dict[str, Any]]

    @property
    def growth_mb(self) -> float:
        return max(self.sampled_growth_mb, self.hwm_growth_mb or 0.0)


class RssMonitor:
    """Samples the RSS of a process tree every 10 ms in a thread while the ``with`` block runs."""

    def __init__(self, root: int) -> None:
        self.root = root
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.result: MemoryResult | None = None

    def __enter__(self) -> RssMonitor:
        self.pids = process_tree(self.root)
        self.hwm_reset: dict[int, bool] = {}
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as file:
                    file.write("5")  # reset VmHWM to the current RSS
                self.hwm_reset[pid] = True
            except OSError:
                self.hwm_reset[pid] = False
        self.before = {pid: rss_bytes(pid) or 0 for pid in self.pids}
        self.peak_pid = dict(self.before)
        self.baseline = sum(self.before.values())
        self.peak = self.baseline
        self.samples = 0
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        total = 0
        for pid in self.pids:
            value = rss_bytes(pid)
            if value is None:
                continue
            total += value
            if value > self.peak_pid.get(pid, 0):
                self.peak_pid[pid] = value
        self.peak = max(self.peak, total)
        self.samples += 1

    def _run(self) -> None:
        next_tree = time.monotonic() + 0.25
        while not self._stop.is_set():
            self._sample()
            if time.monotonic() >= next_tree:  # a process started during the operation counts from 0
                for pid in process_tree(self.root):
                    if pid not in self.pids:
                        self.pids.append(pid)
                        self.before.setdefault(pid, 0)
                        self.hwm_reset.setdefault(pid, True)  # a new process's VmHWM is its own peak
                next_tree = time.monotonic() + 0.25
            self._stop.wait(SAMPLE_SECONDS)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        hwm_growth: float | None = None
        processes: dict[str, dict[str, Any]] = {}
        for pid in self.pids:
            hwm = status_field(pid, "VmHWM")
            before = self.before.get(pid, 0)
            peak = max(self.peak_pid.get(pid, 0), hwm or 0) if self.hwm_reset.get(pid) else self.peak_pid.get(pid, 0)
            if hwm is not None and self.hwm_reset.get(pid):
                growth = (hwm - before) / MIB
                hwm_growth = growth if hwm_growth is None else max(hwm_growth, growth)
            processes[str(pid)] = {
                "command": process_name(pid),
                "rss_before_mb": round(before / MIB, 1),
                "peak_mb": round(peak / MIB, 1),
                "growth_mb": round((peak - before) / MIB, 1),
                "hwm_reset": self.hwm_reset.get(pid, False),
            }
        self.result = MemoryResult(
            baseline_mb=self.baseline / MIB,
            peak_mb=self.peak / MIB,
            sampled_growth_mb=(self.peak - self.baseline) / MIB,
            hwm_growth_mb=hwm_growth,
            samples=self.samples,
            processes=processes,
        )


# --- the server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def centroid_env(data_dir: Path, source: Path | None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CENTROID_")}
    env.pop("DATABASE_URL", None)
    if source is not None:  # import `service` from another source tree (it comes before the editable install)
        env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        {
            "CENTROID_DATA_DIR": str(data_dir),
            "CENTROID_LOG_FORMAT": "json",
            "CENTROID_MAX_UPLOAD_BYTES": HUGE_CAP,  # today's cap on every body
            "CENTROID_MAX_CSV_UPLOAD_BYTES": HUGE_CAP,  # the CSV upload cap being added (default 10 GiB)
        }
    )
    return env


@contextmanager
def centroid_server(work_dir: Path, source: Path | None) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``centroid serve`` in its own process group on a fresh data directory; stopped (the whole group) at exit.
    With ``source``, the server's code is imported from that directory instead of this checkout."""
    data_dir = work_dir / "centroid-data"
    log_path = work_dir / "centroid.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(CENTROID_BIN), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command,
            cwd=source or REPO,
            env=centroid_env(data_dir, source),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {process.returncode}" if process.poll() is not None else "timed out"
                raise RuntimeError(f"centroid serve did not become ready ({state}):\n{log_tail(log_path)}")
            time.sleep(0.1)
        yield url, process, data_dir
    finally:
        stop_group(process)


def log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --- HTTP helpers ---------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def text(self, limit: int = 400) -> str:
        return self.body[:limit].decode(errors="replace")


def curl(args: list[str], work_dir: Path) -> tuple[Answer, float]:
    """Run curl; the answer (status, headers, body) and the wall time of the whole transfer."""
    body_path, head_path = work_dir / "curl-body", work_dir / "curl-head"
    command = ["curl", "-sS", "-o", str(body_path), "-D", str(head_path), "-w", "%{http_code}", *args]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    body = body_path.read_bytes() if body_path.exists() else b""
    headers: dict[str, str] = {}
    if head_path.exists():
        for line in head_path.read_text(errors="replace").splitlines():
            if line.startswith("HTTP/"):
                headers = {}  # a 100 Continue block comes first
            elif ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
    status = int(result.stdout.strip() or 0) if result.stdout.strip().isdigit() else 0
    if status == 0:
        raise StepFailed(f"curl failed ({result.returncode}): {result.stderr.strip()[:400]}")
    if result.returncode != 0 and not 200 <= status < 300:
        # e.g. the server answered 413/415 and closed while curl was still sending
        headers.setdefault("x-curl-error", result.stderr.strip()[:200])
    return Answer(status, headers, body), seconds


def answer_of(response: httpx.Response) -> Answer:
    return Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)


def settle(client: httpx.Client, answer: Answer, what: str, timeout: float = LONG_WAIT) -> dict[str, Any]:
    """The created resource: a 200/201 body as is; a 202 followed until done (its ``Location``, else
    ``GET /datasets/{id}``): polled while it answers 202, 404 or a pending ``status``; a failed one raised."""
    if answer.status in (200, 201):
        return answer.json()
    if answer.status != 202:
        raise StepFailed(f"{what} answered {answer.status}: {answer.text()}")
    body = answer.json() or {}
    location = answer.headers.get("location") or (f"/datasets/{body['id']}" if body.get("id") else None)
    if not location:
        raise StepFailed(f"{what} answered 202 without a Location or an id: {answer.text()}")
    deadline = time.monotonic() + timeout
    while True:
        state = str(body.get("status", "")).lower().replace(" ", "")
        if state in FAILED:
            raise StepFailed(f"{what} ended {body.get('status')}: {json.dumps(body)[:400]}")
        if answer.status in (200, 201) and state not in PENDING:
            break
        if time.monotonic() > deadline:
            raise StepFailed(f"{what} still {body.get('status')!r} after {timeout:.0f} s")
        time.sleep(POLL_SECONDS)
        answer = answer_of(client.get(location, follow_redirects=True))
        if answer.status in (200, 201, 202):
            body = answer.json() or {}
        elif answer.status == 404:  # not visible yet
            body = {}
        else:
            raise StepFailed(f"polling {location} for {what} answered {answer.status}: {answer.text()}")
    if "row_count" not in body:  # a status document naming its result
        for name in ("dataset_id", "result_id", "result_dataset_id"):
            if body.get(name):
                return expect(client.get(f"/datasets/{body[name]}"), 200)
    return body


def expect(response: httpx.Response, *statuses: int) -> Any:
    if response.status_code not in statuses:
        raise StepFailed(
            f"{response.request.method} {response.request.url.path} answered {response.status_code}: "
            f"{response.text[:400]}"
        )
    return response.json() if response.content else None


def delete_dataset(client: httpx.Client, dataset_id: str) -> None:
    with suppress(httpx.HTTPError):
        client.delete(f"/datasets/{dataset_id}")


def stored_parquet(data_dir: Path, dataset_id: str) -> str:
    """The stored Parquet of a dataset (``datasets/<id>.parquet`` under the data dir), as DuckDB reads it."""
    for path in data_dir.rglob(f"{dataset_id}*"):
        if path.is_file() and path.suffix == ".parquet":
            return str(path)
        if path.is_dir():
            return str(path / "**" / "*.parquet")
    raise StepFailed(f"no Parquet file for {dataset_id} under {data_dir}")


# --- baselines in fresh subprocesses ------------------------------------------------------------------

PRELUDE = """
import json, os, resource, sys, time
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1048576
def report(seconds, rows, before, **extra):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("@@result " + json.dumps(
        {"seconds": seconds, "rows": rows, "peak_mb": peak, "growth_mb": peak - before, "extra": extra}))
"""

PANDAS_READ = (
    PRELUDE
    + """
import pandas as pd
pd.read_csv(sys.argv[1], nrows=1000)  # warm-up: lazy imports (pyarrow strings) are not the read's cost
before = rss_mb()
t = time.perf_counter(); frame = pd.read_csv(sys.argv[1]); s = time.perf_counter() - t
report(s, len(frame), before)
"""
)

PYARROW_READ = (
    PRELUDE
    + """
import io
import pyarrow.csv as pacsv
pacsv.read_csv(io.BytesIO(b"a,b\\n1,x\\n"))  # warm-up
before = rss_mb()
t = time.perf_counter(); table = pacsv.read_csv(sys.argv[1]); s = time.perf_counter() - t
report(s, table.num_rows, before)
"""
)

DUCKDB_SQL = (
    PRELUDE
    + """
import duckdb
con = duckdb.connect()
con.execute(sys.argv[2]).fetchall()  # warm-up: read one row of each input
before = rss_mb()
t = time.perf_counter(); rows = con.execute(sys.argv[1]).fetchall()[0][0]; s = time.perf_counter() - t
report(s, rows, before)
"""
)

MINIBATCH = (
    PRELUDE
    + """
import numpy as np, pyarrow.parquet as pq
from sklearn.cluster import MiniBatchKMeans
path, k, batch, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
columns = json.loads(sys.argv[5])
before = rss_mb()
t = time.perf_counter()
model = MiniBatchKMeans(n_clusters=k, n_init=1, batch_size=batch, random_state=seed)
rows = 0
pending = None
for b in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=columns):
    x = np.column_stack([b.column(i).to_numpy() for i in range(b.num_columns)]).astype(np.float64)
    if pending is not None:  # the first partial_fit needs at least k rows
        x = np.vstack([pending, x]); pending = None
    if len(x) < k:
        pending = x; continue
    model.partial_fit(x); rows += len(x)
total = 0.0
for b in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=columns):
    x = np.column_stack([b.column(i).to_numpy() for i in range(b.num_columns)]).astype(np.float64)
    total += float((model.transform(x).min(axis=1) ** 2).sum())
s = time.perf_counter() - t
report(s, rows, before, msd=total / max(rows, 1))
"""
)


@dataclass
class Baseline:
    seconds: float
    rows: int
    peak_mb: float
    growth_mb: float
    extra: dict[str, Any] = field(default_factory=dict)


def run_baseline(code: str, *args: str) -> Baseline:
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("@@result ")]
    if result.returncode != 0 or not lines:
        raise StepFailed(f"baseline subprocess failed ({result.returncode}): {result.stderr.strip()[-800:]}")
    return Baseline(**json.loads(lines[-1][len("@@result ") :]))


def duckdb_derive_sql(main: str, extra: str, out: Path) -> str:
    """join on id -> minmax of DERIVE_COLUMNS to [-1, 1] -> select them, in one COPY, rows in the
    left side's order (DuckDB's defaults otherwise: all threads, 80% of RAM)."""
    left = [f"a.{c}" for c in FEATURES[:10]]
    right = [f"b.{c}" for c in EXTRA]
    bounds = ", ".join(f"min({c}) AS lo_{c}, max({c}) AS hi_{c}" for c in DERIVE_COLUMNS)
    scaled = ", ".join(
        f"CASE WHEN m.hi_{c} > m.lo_{c} THEN -1 + 2 * (j.{c} - m.lo_{c}) / (m.hi_{c} - m.lo_{c}) ELSE 0 END AS {c}"
        for c in DERIVE_COLUMNS
    )
    # The same result as the service's: the left side's row order kept (ORDER BY its row number).
    return (
        f"COPY (WITH j AS (SELECT a.file_row_number AS rn, a.{KEY}, {', '.join(left + right)} "
        f"FROM read_parquet('{main}', file_row_number=true) a JOIN read_parquet('{extra}') b ON a.{KEY} = b.{KEY}), "
        f"m AS (SELECT {bounds} FROM j) "
        f"SELECT j.{KEY}, {scaled} FROM j CROSS JOIN m ORDER BY j.rn) TO '{out}' (FORMAT parquet)"
    )


# --- the run --------------------------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "s":
        return f"{value:.2f} s" if value < 100 else f"{value:,.0f} s"
    if unit == "MB":
        return f"{value:,.0f} MB"
    if unit == "rows/s":
        return f"{value:,.0f} rows/s"
    return f"{value:g}"


def fmt_range(values: list[float], unit: str) -> str:
    if len(values) < 2:
        return ""
    return f"{fmt(min(values), unit)} – {fmt(max(values), unit)}"


def size_label(rows: int) -> str:
    if rows >= 1_000_000 and rows % 1_000_000 == 0:
        return f"{rows // 1_000_000}M"
    if rows >= 1_000 and rows % 1_000 == 0:
        return f"{rows // 1_000}k"
    return f"{rows:,}"


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        url: str,
        server: subprocess.Popen[bytes],
        data_dir: Path,
        work_dir: Path,
        log_path: Path,
    ) -> None:
        self.args = args
        self.url = url
        self.server = server
        self.data_dir = data_dir
        self.work_dir = work_dir
        self.log_path = log_path
        self.client = httpx.Client(base_url=url, timeout=HTTP_TIMEOUT)
        self.rows: list[Row] = []
        self.errors: list[str] = []
        self.memory: list[dict[str, Any]] = []  # every monitored operation, for --json
        self.endpoint_ready = False
        self.counter = 0

    def unique(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def monitored(self, label: str, operation: Callable[..., Any], *args: Any) -> tuple[Any, MemoryResult, float]:
        """Run ``operation(*args)`` while sampling the server's memory; its result, the memory, the wall time."""
        monitor = RssMonitor(self.server.pid)
        with monitor:
            started = time.perf_counter()
            value = operation(*args)
            seconds = time.perf_counter() - started
        assert monitor.result is not None
        self.memory.append({"operation": label, "seconds": seconds, **asdict(monitor.result)})
        return value, monitor.result, seconds

    def fail(self, rows: Sequence[Row], step: str, size: int, error: BaseException) -> None:
        message = f"{step} ({size_label(size)}): {error}"
        if not isinstance(error, (StepFailed, Unavailable, httpx.HTTPError)):
            message += "\n" + "".join(traceback.format_exception(error)[-6:])
        print(f"  error: {message}", file=sys.stderr, flush=True)
        self.errors.append(message)
        for row in rows:
            if not row.values:
                row.status, row.note = "error", str(error)[:200]

    # --- step 1: upload ---

    def upload_multipart(self, path: Path, name: str) -> dict[str, Any]:
        answer, _ = curl(
            [
                "-F",
                f"file=@{path};type=text/csv",
                "-F",
                f"name={name}",
                "-F",
                f"key_column={KEY}",
                f"{self.url}/datasets",
            ],
            self.work_dir,
        )
        return settle(self.client, answer, "multipart upload")

    def upload_raw(self, path: Path, name: str) -> dict[str, Any]:
        answer, _ = curl(
            [
                "-X",
                "POST",
                "-T",
                str(path),
                "-H",
                "Content-Type: text/csv",
                f"{self.url}/datasets?name={name}&key_column={KEY}",
            ],
            self.work_dir,
        )
        if answer.status in UNAVAILABLE:
            raise Unavailable(f"answered {answer.status}: {answer.text(200)}")
        return settle(self.client, answer, "raw text/csv upload")

    def step_upload(self, rows: int, files: Files, repeat: int) -> str | None:
        label = size_label(rows)
        small = rows <= 1_000_000
        t_multi = self.add(
            Row(
                rows,
                "upload, multipart (`curl -F`)",
                "s",
                baseline="pandas.read_csv",
                target="≤ 2 × pandas" if small else "",
                check=ratio_at_most(2.0) if small else None,
            )
        )
        m_multi = self.add(
            Row(
                rows,
                "upload, multipart: peak RSS growth",
                "MB",
                baseline="pandas.read_csv growth",
                target="≤ 256 MB",
                check=value_at_most(256),
            )
        )
        t_raw = self.add(
            Row(
                rows,
                "upload, raw `text/csv` body (`curl -T`)",
                "s",
                baseline="pandas.read_csv",
                target="≤ 2 × pandas" if small else "",
                check=ratio_at_most(2.0) if small else None,
            )
        )
        m_raw = self.add(
            Row(rows, "upload, raw body: peak RSS growth", "MB", target="≤ 256 MB", check=value_at_most(256))
        )
        t_arrow = self.add(Row(rows, "reference: pyarrow.csv.read_csv", "s", baseline="pandas.read_csv"))
        kept: str | None = None
        raw_available = True
        for index in range(repeat):
            order = ["pandas", "pyarrow", "multipart", "raw"]
            order = order if index % 2 == 0 else order[::-1]
            for what in order:
                try:
                    if what == "pyarrow":
                        arrow = run_baseline(PYARROW_READ, str(files.main))
                        t_arrow.values.append(arrow.seconds)
                        print(
                            f"  [{index + 1}/{repeat}] pyarrow.csv        {arrow.seconds:8.2f} s  "
                            f"RSS +{arrow.growth_mb:,.0f} MB",
                            flush=True,
                        )
                    elif what == "pandas":
                        base = run_baseline(PANDAS_READ, str(files.main))
                        if base.rows != rows:
                            raise StepFailed(f"pandas read {base.rows} rows, not {rows}")
                        for row in (t_multi, t_raw, t_arrow):
                            row.baseline_values.append(base.seconds)
                        m_multi.baseline_values.append(base.growth_mb)
                        print(
                            f"  [{index + 1}/{repeat}] pandas.read_csv    {base.seconds:8.2f} s  "
                            f"RSS +{base.growth_mb:,.0f} MB",
                            flush=True,
                        )
                    elif what == "multipart":
                        name = self.unique(f"main-{label}")
                        body, memory, seconds = self.monitored(
                            f"upload multipart {label}", self.upload_multipart, files.main, name
                        )
                        if body.get("row_count") != rows:
                            raise StepFailed(f"the upload has {body.get('row_count')} rows, not {rows}")
                        t_multi.values.append(seconds)
                        m_multi.values.append(memory.growth_mb)
                        print(
                            f"  [{index + 1}/{repeat}] upload multipart   {seconds:8.2f} s  "
                            f"RSS +{memory.growth_mb:,.0f} MB",
                            flush=True,
                        )
                        if kept is None:
                            kept = body["id"]
                        else:
                            delete_dataset(self.client, body["id"])
                    elif raw_available:
                        name = self.unique(f"raw-{label}")
                        try:
                            body, memory, seconds = self.monitored(
                                f"upload raw {label}", self.upload_raw, files.main, name
                            )
                        except Unavailable as error:
                            raw_available = False
                            for row in (t_raw, m_raw):
                                row.status, row.note = "n/a", f"not available: {error}"
                            print(f"  raw text/csv upload not available: {error}", flush=True)
                            continue
                        if body.get("row_count") != rows:
                            raise StepFailed(f"the raw upload has {body.get('row_count')} rows, not {rows}")
                        t_raw.values.append(seconds)
                        m_raw.values.append(memory.growth_mb)
                        print(
                            f"  [{index + 1}/{repeat}] upload raw body    {seconds:8.2f} s  "
                            f"RSS +{memory.growth_mb:,.0f} MB",
                            flush=True,
                        )
                        delete_dataset(self.client, body["id"])
                except (StepFailed, httpx.HTTPError, OSError, subprocess.SubprocessError) as error:
                    rows_of = {
                        "pandas": [t_multi],
                        "pyarrow": [t_arrow],
                        "multipart": [t_multi, m_multi],
                        "raw": [t_raw, m_raw],
                    }[what]
                    self.fail(rows_of, f"upload/{what}", rows, error)
        return kept

    # --- step 2: derive ---

    def step_derive(self, rows: int, files: Files, main_id: str | None, repeat: int) -> None:
        label = size_label(rows)
        t_row = self.add(
            Row(
                rows,
                "derive: join + minmax scale + select",
                "s",
                baseline="DuckDB COPY",
                target="≤ 2 × DuckDB",
                check=ratio_at_most(2.0),
            )
        )
        m_row = self.add(
            Row(
                rows,
                "derive: peak RSS growth",
                "MB",
                baseline="DuckDB growth",
                target="≤ 512 MB",
                check=value_at_most(512),
            )
        )
        u_row = self.add(Row(rows, "upload of the join's other side (id + 3 floats)", "s"))
        if main_id is None:
            for row in (t_row, m_row, u_row):
                row.status, row.note = "skipped", "no uploaded dataset (the upload step failed or was not run)"
            return
        try:
            extra, _, seconds = self.monitored(
                f"upload extra {label}", lambda: self.upload_multipart(files.extra, self.unique(f"extra-{label}"))
            )
            if extra.get("row_count") != rows:
                raise StepFailed(f"the other side has {extra.get('row_count')} rows, not {rows}")
            u_row.values.append(seconds)
            print(f"  upload of the other side     {seconds:8.2f} s", flush=True)
            main_path, extra_path = stored_parquet(self.data_dir, main_id), stored_parquet(self.data_dir, extra["id"])
        except (StepFailed, httpx.HTTPError, OSError, subprocess.SubprocessError) as error:
            self.fail([t_row, m_row, u_row], "derive/upload", rows, error)
            return
        request = {
            "name": f"derived-{label}",
            "steps": [
                {"op": "join", "dataset_id": extra["id"], "how": "inner", "on": KEY},
                {"op": "scale", "columns": DERIVE_COLUMNS, "method": "minmax", "feature_range": [-1, 1]},
                {"op": "select", "columns": DERIVE_COLUMNS},
            ],
        }
        out = self.work_dir / "duckdb-derive.parquet"
        sql = duckdb_derive_sql(main_path, extra_path, out)
        warm_up = f"SELECT * FROM read_parquet('{main_path}') a, read_parquet('{extra_path}') b LIMIT 1"

        def derive() -> dict[str, Any]:
            response = self.client.post(f"/datasets/{main_id}/derive", json=request)
            return settle(self.client, answer_of(response), "derive")

        for index in range(repeat):
            for what in ["duckdb", "centroid"] if index % 2 == 0 else ["centroid", "duckdb"]:
                try:
                    if what == "duckdb":
                        base = run_baseline(DUCKDB_SQL, sql, warm_up)
                        out.unlink(missing_ok=True)
                        if base.rows != rows:
                            raise StepFailed(f"DuckDB wrote {base.rows} rows, not {rows}")
                        t_row.baseline_values.append(base.seconds)
                        m_row.baseline_values.append(base.growth_mb)
                        print(
                            f"  [{index + 1}/{repeat}] DuckDB COPY        {base.seconds:8.2f} s  "
                            f"RSS +{base.growth_mb:,.0f} MB",
                            flush=True,
                        )
                    else:
                        body, memory, seconds = self.monitored(f"derive {label}", derive)
                        columns = [c["name"] for c in body.get("columns", [])]
                        if body.get("row_count") != rows or columns != [KEY, *DERIVE_COLUMNS]:
                            raise StepFailed(
                                f"the derived dataset has {body.get('row_count')} rows and columns "
                                f"{columns}; expected {rows} and {[KEY, *DERIVE_COLUMNS]}"
                            )
                        t_row.values.append(seconds)
                        m_row.values.append(memory.growth_mb)
                        print(
                            f"  [{index + 1}/{repeat}] derive             {seconds:8.2f} s  "
                            f"RSS +{memory.growth_mb:,.0f} MB",
                            flush=True,
                        )
                        delete_dataset(self.client, body["id"])
                except (StepFailed, httpx.HTTPError, OSError, subprocess.SubprocessError) as error:
                    self.fail([t_row, m_row] if what == "centroid" else [t_row], f"derive/{what}", rows, error)
        delete_dataset(self.client, extra["id"])

    # --- step 3: predictions ---

    def wait_job(self, name: str, timeout: float = LONG_WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body: dict[str, Any] = expect(self.client.get(f"/training-jobs/{name}"), 200)
            if body["status"] == "Completed":
                return body
            if body["status"] in ("Failed", "Stopped"):
                raise StepFailed(f"training job {name} is {body['status']}: {body.get('failure_reason')}")
            if time.monotonic() > deadline:
                raise StepFailed(f"training job {name} still {body['status']} after {timeout:.0f} s")
            time.sleep(POLL_SECONDS * 2)

    def ensure_endpoint(self, train_id: str, rows: int) -> None:
        if self.endpoint_ready:
            return
        job = self.unique("bench-k10")
        started = time.perf_counter()
        expect(
            self.client.post(
                "/training-jobs",
                json={"name": job, "train_dataset_id": train_id, "hyperparameters": {"k": 10, "epochs": 1, "seed": 7}},
            ),
            202,
        )
        model_id = self.wait_job(job)["model_id"]
        trained = time.perf_counter() - started
        expect(self.client.post("/endpoints", json={"name": ENDPOINT, "model_id": model_id}), 202)
        deadline = time.monotonic() + 600
        while True:
            body = expect(self.client.get(f"/endpoints/{ENDPOINT}"), 200)
            if body["status"] == "InService":
                break
            if body["status"] == "Failed" or time.monotonic() > deadline:
                raise StepFailed(f"endpoint {ENDPOINT} is {body['status']}: {body.get('failure_reason')}")
            time.sleep(POLL_SECONDS)
        self.endpoint_ready = True
        print(
            f"  model k=10 (epochs 1) trained on {size_label(rows)} rows in {trained:.2f} s; "
            f"endpoint {ENDPOINT} InService after {time.perf_counter() - started:.2f} s",
            flush=True,
        )

    def predict_stream(self, dataset_id: str, accept: str) -> dict[str, Any]:
        """POST predictions for a whole dataset; read the answer as a stream and count its rows."""
        started = time.perf_counter()
        first_byte: float | None = None
        newlines = 0
        head = b""
        size = 0
        body = b""
        with self.client.stream(
            "POST", f"/endpoints/{ENDPOINT}/predictions", json={"dataset_id": dataset_id}, headers={"Accept": accept}
        ) as response:
            if response.status_code in UNAVAILABLE:
                response.read()
                raise Unavailable(f"answered {response.status_code}: {response.text[:200]}")
            if response.status_code != 200:
                response.read()
                raise StepFailed(f"predictions answered {response.status_code}: {response.text[:400]}")
            content_type = response.headers.get("content-type", "").split(";")[0].strip()
            whole = content_type == "application/json"
            chunks = []
            for chunk in response.iter_bytes():
                if first_byte is None:
                    first_byte = time.perf_counter() - started
                size += len(chunk)
                newlines += chunk.count(b"\n")
                if len(head) < 4096:
                    head += chunk[:4096]
                if whole:
                    chunks.append(chunk)
            if whole:
                body = b"".join(chunks)
        seconds = time.perf_counter() - started
        if whole:
            counted = len(json.loads(body).get("predictions", []))
            note = f"answered application/json, not {accept}: the whole body at once"
        else:
            first_line = head.split(b"\n", 1)[0].lower()
            header = accept == "text/csv" and b"cluster" in first_line
            counted = newlines - int(header)
            note = f"answered {content_type}" + (", with a header line" if header else "")
        return {
            "rows": counted,
            "seconds": seconds,
            "first_byte": first_byte,
            "bytes": size,
            "note": note,
            "content_type": content_type,
        }

    def step_predictions(self, rows: int, main_id: str | None, train_id: str | None, repeat: int) -> None:
        label = size_label(rows)
        pairs = {}
        for accept in ("application/jsonlines", "text/csv"):
            pairs[accept] = (
                self.add(
                    Row(
                        rows,
                        f"predictions of the dataset, `Accept: {accept}`",
                        "rows/s",
                        target="≥ 1,000,000 rows/s",
                        check=value_at_least(1_000_000),
                    )
                ),
                self.add(
                    Row(
                        rows,
                        f"predictions ({accept}): peak RSS growth",
                        "MB",
                        target="≤ 256 MB",
                        check=value_at_most(256),
                    )
                ),
            )
        if main_id is None or train_id is None:
            for pair in pairs.values():
                for row in pair:
                    row.status, row.note = "skipped", "no uploaded dataset (the upload step failed or was not run)"
            return
        try:
            self.ensure_endpoint(train_id, rows)
        except (StepFailed, httpx.HTTPError) as error:
            self.fail([row for pair in pairs.values() for row in pair], "predictions/model", rows, error)
            return
        for accept, (speed, memory_row) in pairs.items():
            for index in range(repeat):
                try:
                    result, memory, _ = self.monitored(
                        f"predictions {accept} {label}", self.predict_stream, main_id, accept
                    )
                except Unavailable as error:
                    for row in (speed, memory_row):
                        row.status, row.note = "n/a", f"not available: {error}"
                    print(f"  predictions with Accept {accept}: not available ({error})", flush=True)
                    break
                except (StepFailed, httpx.HTTPError, ValueError) as error:
                    self.fail([speed, memory_row], f"predictions/{accept}", rows, error)
                    break
                if result["rows"] != rows:
                    self.fail(
                        [speed, memory_row],
                        f"predictions/{accept}",
                        rows,
                        StepFailed(f"counted {result['rows']} rows, not {rows} ({result['note']})"),
                    )
                    break
                speed.values.append(rows / result["seconds"])
                memory_row.values.append(memory.growth_mb)
                speed.note = memory_row.note = result["note"]
                print(
                    f"  [{index + 1}/{repeat}] predictions {accept:<22} {result['seconds']:7.2f} s "
                    f"({rows / result['seconds']:,.0f} rows/s, first byte {result['first_byte'] or 0:.2f} s, "
                    f"{result['bytes'] / MIB:,.1f} MiB, {result['note']})  RSS +{memory.growth_mb:,.0f} MB",
                    flush=True,
                )

    # --- step 4: train k = 64 ---

    def train(self, name: str, dataset_id: str, k: int) -> dict[str, Any]:
        """A training job of ``k`` clusters (SageMaker's defaults otherwise), waited for until Completed."""
        job = {"name": name, "train_dataset_id": dataset_id, "hyperparameters": {"k": k, "seed": 7}}
        expect(self.client.post("/training-jobs", json=job), 202)
        return self.wait_job(name)

    def step_train(self, rows: int, main_id: str | None, repeat: int) -> None:
        label = size_label(rows)
        t_row = self.add(
            Row(rows, "train k=64 (POST → Completed)", "s", baseline="MiniBatchKMeans partial_fit", target="completes")
        )
        m_row = self.add(
            Row(
                rows,
                "train k=64: peak RSS growth",
                "MB",
                baseline="MiniBatchKMeans growth",
                target="≤ 256 MB",
                check=value_at_most(256),
            )
        )
        if main_id is None:
            for row in (t_row, m_row):
                row.status, row.note = "skipped", "no uploaded dataset (the upload step failed or was not run)"
            return
        parquet: str | None = None
        with suppress(StepFailed):
            parquet = stored_parquet(self.data_dir, main_id)
        batch = None
        for index in range(repeat):
            for what in ["centroid", "sklearn"] if index % 2 == 0 else ["sklearn", "centroid"]:
                try:
                    if what == "centroid":
                        name = self.unique(f"bench-k64-{label}")
                        job, memory, seconds = self.monitored(f"train k=64 {label}", self.train, name, main_id, 64)
                        batch = int(job["hyperparameters"].get("mini_batch_size") or 5000)
                        t_row.values.append(seconds)
                        m_row.values.append(memory.growth_mb)
                        model = expect(self.client.get(f"/models/{job['model_id']}"), 200)
                        train_msd = (model.get("metrics") or {}).get("train_msd")
                        t_row.note = (
                            f"Completed; job's training_seconds {job.get('training_seconds')}, "
                            f"mini_batch_size {batch}, train_msd {train_msd}"
                        )
                        print(
                            f"  [{index + 1}/{repeat}] train k=64         {seconds:8.2f} s  "
                            f"(job's training_seconds {job.get('training_seconds')})  "
                            f"RSS +{memory.growth_mb:,.0f} MB  [{processes_summary(memory)}]",
                            flush=True,
                        )
                    else:
                        if parquet is None:
                            raise StepFailed("no stored Parquet file found for the baseline")
                        base = run_baseline(MINIBATCH, parquet, "64", str(batch or 5000), "7", json.dumps(FEATURES))
                        t_row.baseline_values.append(base.seconds)
                        m_row.baseline_values.append(base.growth_mb)
                        m_row.note = f"MiniBatchKMeans msd {base.extra.get('msd')}"
                        print(
                            f"  [{index + 1}/{repeat}] MiniBatchKMeans    {base.seconds:8.2f} s  "
                            f"RSS +{base.growth_mb:,.0f} MB  msd {base.extra.get('msd')}",
                            flush=True,
                        )
                except (StepFailed, httpx.HTTPError, OSError, subprocess.SubprocessError) as error:
                    self.fail([t_row, m_row] if what == "centroid" else [], f"train/{what}", rows, error)


def processes_summary(memory: MemoryResult) -> str:
    return "; ".join(
        f"pid {pid} {info['command'][:40]} +{info['growth_mb']:,.0f} MB" for pid, info in memory.processes.items()
    )


# --- report ---------------------------------------------------------------------------------------


def report(rows: list[Row]) -> str:
    lines = [
        "| size | what | median | range | baseline | baseline median | ratio | target | result |",
        "|---|---|---:|---|---|---:|---:|---|---|",
    ]
    notes: dict[tuple[int, str], list[str]] = {}  # the same note for several rows is printed once
    for row in rows:
        ratio = f"{row.ratio:.2f}×" if row.ratio is not None else ""
        lines.append(
            f"| {size_label(row.size)} | {row.what} | {fmt(row.median, row.unit)} | {fmt_range(row.values, row.unit)} "
            f"| {row.baseline} | {fmt(row.baseline_median, row.unit if row.unit != 'rows/s' else '')} | {ratio} "
            f"| {row.target} | {row.verdict} |"
        )
        if row.note:
            notes.setdefault((row.size, row.note), []).append(row.what)
    described = [f"- {size_label(size)}, {'; '.join(whats)}: {note}" for (size, note), whats in notes.items()]
    return "\n".join(lines + ([""] + described if described else []))


def machine_info() -> dict[str, Any]:
    import duckdb
    import pandas
    import pyarrow
    import sklearn

    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "pandas": pandas.__version__,
        "pyarrow": pyarrow.__version__,
        "duckdb": duckdb.__version__,
        "scikit-learn": sklearn.__version__,
        "load average": " ".join(f"{value:.2f}" for value in os.getloadavg()),
    }


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000", help="comma-separated row counts (default: 1M,10M)")
    parser.add_argument("--repeat", type=int, help="repeats of each timed operation (default: 3 below 5M rows, else 1)")
    parser.add_argument("--train-repeat", type=int, default=1, help="repeats of the k=64 training (default: 1)")
    parser.add_argument("--steps", default=",".join(ALL_STEPS), help=f"subset of {','.join(ALL_STEPS)} (default: all)")
    parser.add_argument("--data-dir", type=Path, help="where the CSVs go (existing files of the same name are reused)")
    parser.add_argument("--keep-files", action="store_true", help="keep the generated CSVs at exit")
    parser.add_argument(
        "--work-dir", type=Path, help="parent of the server's temporary data directory (default: TMPDIR)"
    )
    parser.add_argument(
        "--source",
        type=Path,
        metavar="DIR",
        help="run the server's code from this source tree instead of this checkout (PYTHONPATH=DIR), "
        "e.g. a `git archive <commit> | tar -x -C DIR` for before/after numbers",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data (default: 0)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(size.replace("_", "")) for size in args.sizes.split(",") if size.strip()]
    except ValueError:
        parser.error("--sizes must be comma-separated whole numbers")
    if not args.sizes or min(args.sizes) < 100:
        parser.error("--sizes must name at least one size of 100 rows or more")
    args.steps = [step.strip() for step in args.steps.split(",") if step.strip()]
    unknown = sorted(set(args.steps) - set(ALL_STEPS))
    if unknown or not args.steps:
        parser.error(f"unknown step(s) {unknown}; choose from {', '.join(ALL_STEPS)}")
    if (args.repeat is not None and args.repeat < 1) or args.train_repeat < 1:
        parser.error("--repeat and --train-repeat must be at least 1")
    if args.source is not None:
        args.source = args.source.resolve()
        if not (args.source / "service" / "cli.py").exists():
            parser.error(f"--source {args.source} holds no service/cli.py")
    if not CENTROID_BIN.exists():
        parser.error(f"{CENTROID_BIN} not found: run with the project's venv (.venv/bin/python)")
    if shutil.which("curl") is None:
        parser.error("curl is not installed (Debian/Ubuntu: apt-get install curl)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    info = machine_info()
    print("Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()), flush=True)
    print("Command: " + " ".join([Path(sys.executable).name, "benchmarks/bench_datasets.py", *(argv or sys.argv[1:])]))

    bench: Bench | None = None
    generated: list[Path] = []
    csv_dir: Path | None = None
    with ExitStack() as stack:
        work_dir = Path(tempfile.mkdtemp(prefix="centroid-bench-datasets-", dir=args.work_dir))
        stack.callback(shutil.rmtree, work_dir, ignore_errors=True)
        if args.data_dir:
            csv_dir = args.data_dir
            csv_dir.mkdir(parents=True, exist_ok=True)
        else:
            csv_dir = Path(tempfile.mkdtemp(prefix="centroid-bench-csv-", dir=args.work_dir))
            if not args.keep_files:
                stack.callback(shutil.rmtree, csv_dir, ignore_errors=True)

        def remove_generated() -> None:
            if not args.keep_files:
                for path in generated:
                    path.unlink(missing_ok=True)

        stack.callback(remove_generated)

        try:
            url, server, data_dir = stack.enter_context(centroid_server(work_dir, args.source))
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        log_path = work_dir / "centroid.log"
        code = f"code from {args.source}" if args.source else f"code from {REPO}"
        print(f"centroid serve (pid {server.pid}) at {url}, {code}, data dir {data_dir}", flush=True)
        bench = Bench(args, url, server, data_dir, work_dir, log_path)
        stack.callback(bench.client.close)
        train_id: str | None = None
        for rows in sorted(args.sizes):
            repeat = args.repeat or (3 if rows < 5_000_000 else 1)
            print(f"\n## {size_label(rows)} rows ({repeat} repeat(s))", flush=True)
            try:
                files = ensure_files(csv_dir, rows, args.seed)
                generated += files.generated
            except (OSError, ValueError) as error:
                bench.errors.append(f"generating the {size_label(rows)} files: {error}")
                print(f"  error: generating files: {error}", file=sys.stderr)
                continue
            main_id: str | None = None
            if "upload" in args.steps or {"derive", "predictions", "train"} & set(args.steps):
                if "upload" in args.steps:
                    print("- upload", flush=True)
                    main_id = bench.step_upload(rows, files, repeat)
                else:
                    try:
                        main_id = bench.upload_multipart(files.main, f"main-{size_label(rows)}")["id"]
                    except (StepFailed, httpx.HTTPError) as error:
                        bench.errors.append(f"upload ({size_label(rows)}): {error}")
            if train_id is None:
                train_id = main_id
            if "derive" in args.steps:
                print("- derive", flush=True)
                bench.step_derive(rows, files, main_id, repeat)
            if "predictions" in args.steps:
                print("- predictions", flush=True)
                bench.step_predictions(rows, main_id, train_id, repeat)
            if "train" in args.steps:
                print("- train k=64", flush=True)
                bench.step_train(rows, main_id, args.train_repeat)
        if bench.errors:
            print(f"\ncentroid.log ends with:\n{log_tail(log_path, 1500)}", file=sys.stderr)
        if args.keep_files and csv_dir:
            print(f"\nCSV files kept in {csv_dir}")

    assert bench is not None
    print("\n" + report(bench.rows))
    if bench.errors:
        print(f"\n{len(bench.errors)} step(s) failed:", file=sys.stderr)
        for message in bench.errors:
            print(f"- {message.splitlines()[0]}", file=sys.stderr)
    if args.json:
        payload = {
            "machine": info,
            "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "rows": [row.as_json() for row in bench.rows],
            "memory": bench.memory,
            "errors": bench.errors,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        print(f"results written to {args.json}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; server stopped and temporary files removed.", file=sys.stderr)
        sys.exit(130)
