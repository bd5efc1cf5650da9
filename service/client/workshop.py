"""Lab 3 of the SageMaker k-means workshop as one function over the HTTP API, and a throwaway
server to run it on.

:func:`run_workshop` does what the README's walk-throughs do with curl: upload the crimes and
densities tables (keyed by ``State``), scale density to [-1, 1], inner-join on the state and keep
the five features, train k = 10 and wait, deploy an endpoint and wait, predict every state sorted
by cluster then distance (with the count per cluster), and save the model's plots.

:class:`LocalServer` starts ``centroid serve`` on the embedded defaults (a temporary data
directory, SQLite, the embedded worker, 127.0.0.1 on a free port) for ``centroid workshop`` without
``--url``, and stops it afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `centroid workshop` starts its server before loading httpx
    from service.client.http import CentroidClient

PLOT_KINDS = ("sizes", "centroids", "projection", "states")
#: As ``service.sample_data`` names them (the README's derive request).
WORKSHOP_FEATURES = ["Murder", "Assault", "UrbanPop", "Rape", "DensityPerMile"]
KEY_COLUMN = "State"
K = 10
SEED = 7
#: The workshop waits on work that takes milliseconds: poll often (``--wait`` polls every 0.5 s).
WORKSHOP_POLL_SECONDS = 0.02

Step = Callable[[str], None]


@dataclass
class WorkshopResult:
    """What the workshop made and found; :meth:`document` is the ``--json`` output."""

    url: str
    datasets: dict[str, str] = field(default_factory=dict)
    training_job: str = ""
    model_id: str = ""
    endpoint: str = ""
    predictions: list[dict[str, Any]] = field(default_factory=list)
    cluster_counts: dict[str, int] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plot_errors: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "datasets": self.datasets,
            "training_job": self.training_job,
            "model_id": self.model_id,
            "endpoint": self.endpoint,
            "predictions": self.predictions,
            "cluster_counts": self.cluster_counts,
            "plots": self.plots,
            "notes": self.notes + self.plot_errors,
            "seconds": self.seconds,
        }


def sample_data_dir() -> Path:
    """Where ``service.sample_data`` keeps the workshop's CSV files. The package is located, not
    imported: its module loads pandas, half a second this command does not need."""
    from service.client.http import ClientError

    spec = importlib.util.find_spec("service.sample_data")
    if spec is None or spec.origin is None:
        raise ClientError("the workshop's sample data (service/sample_data) is not installed")
    return Path(spec.origin).parent


def resource_names(own_server: bool) -> tuple[str, str]:
    """The training job's and endpoint's names: the README's on a server of its own; with a random
    suffix on a shared one (names are unique there, and a second run must not collide)."""
    if own_server:
        return "crime-k10", "crime"
    suffix = secrets.token_hex(3)
    return f"crime-k10-{suffix}", f"crime-{suffix}"


def run_workshop(
    client: CentroidClient,
    out_dir: Path,
    *,
    job_name: str,
    endpoint_name: str,
    step: Step | None = None,
) -> WorkshopResult:
    """Lab 3 against the server ``client`` talks to; plots go to ``out_dir``. Raises
    :class:`~service.client.http.ClientError` when a step fails (plots excepted: see ``notes``)."""
    from service.client.http import ClientError

    say = step or (lambda _message: None)
    result = WorkshopResult(url=client.url, training_job=job_name, endpoint=endpoint_name)

    samples = sample_data_dir()
    crimes = client.upload_csv(samples / "crimes.csv", name="crimes", key_column=KEY_COLUMN)
    densities = client.upload_csv(samples / "densities.csv", name="densities", key_column=KEY_COLUMN)
    say(f"uploaded crimes ({crimes['id']}, {crimes['row_count']} rows) and densities ({densities['id']})")
    scaled = client.derive(
        densities["id"],
        {
            "name": "densities-scaled",
            "steps": [{"op": "scale", "columns": ["DensityPerMile"], "method": "minmax", "feature_range": [-1, 1]}],
        },
    )
    workshop = client.derive(
        crimes["id"],
        {
            "name": "workshop",
            "steps": [
                {"op": "join", "dataset_id": scaled["id"], "how": "inner"},
                {"op": "select", "columns": WORKSHOP_FEATURES},
            ],
        },
    )
    result.datasets = {
        "crimes": crimes["id"],
        "densities": densities["id"],
        "densities_scaled": scaled["id"],
        "workshop": workshop["id"],
    }
    say(f"derived the workshop dataset {workshop['id']}: {workshop['row_count']} states, density scaled to [-1, 1]")

    client.create_training_job(
        {
            "name": job_name,
            "train_dataset_id": workshop["id"],
            "hyperparameters": {"k": K, "init_method": "kmeans++", "seed": SEED},
        }
    )
    job = client.wait_for_training_job(job_name, poll_seconds=WORKSHOP_POLL_SECONDS)
    if job["status"] != "Completed":
        raise ClientError(f"training job {job_name} {job['status']}: {job.get('failure_reason') or 'no reason given'}")
    result.model_id = job["model_id"]
    say(f"trained {job_name} (k = {K}): model {result.model_id}")

    # The plots are drawn (matplotlib, in the server) while the endpoint is deployed and predicts.
    with ThreadPoolExecutor(max_workers=len(PLOT_KINDS)) as pool:
        plots = {kind: pool.submit(client.plot, result.model_id, kind) for kind in PLOT_KINDS}
        client.create_endpoint({"name": endpoint_name, "model_id": result.model_id})
        endpoint = client.wait_for_endpoint(endpoint_name, poll_seconds=WORKSHOP_POLL_SECONDS)
        if endpoint["status"] != "InService":
            raise ClientError(f"endpoint {endpoint_name} {endpoint['status']}: {endpoint.get('failure_reason')}")
        say(f"deployed endpoint {endpoint_name}: InService")
        answer = client.predictions(endpoint_name, {"dataset_id": workshop["id"], "sort": "cluster,distance"})
        result.predictions = answer["predictions"]
        result.cluster_counts = answer["cluster_counts"]
        say(f"predicted {len(result.predictions)} states")
        _save_plots(result, plots, out_dir)
        say(f"plots: {', '.join(result.plots) or 'none'}")
    return result


def _save_plots(result: WorkshopResult, plots: dict[str, Any], out_dir: Path) -> None:
    """Write each plot the server drew; a route it does not have yet is a note, another error too
    (kept apart in ``plot_errors``: the command then ends with exit code 1)."""
    from service.client.http import ApiError

    for kind, future in plots.items():
        try:
            image: bytes = future.result()
        except ApiError as error:
            if error.route_missing:
                result.notes.append(f"this server has no {kind} plot (GET /models/{{id}}/plots/{kind}.png is 404)")
            else:
                result.plot_errors.append(f"the {kind} plot failed: {error}")
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{kind}.png"
        path.write_bytes(image)
        result.plots[kind] = str(path)


# --- a server of its own -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_environment(data_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the throwaway server: this one without any Centroid setting (nor a
    database URL or a metrics directory that belong to another deployment), on the embedded
    defaults in ``data_dir``."""
    env = dict(os.environ if base is None else base)
    for name in list(env):
        if name.startswith("CENTROID_") or name in ("DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR"):
            del env[name]
    env.update(
        {
            "CENTROID_DATA_DIR": str(data_dir),
            "CENTROID_EMBEDDED_WORKER": "true",
            "CENTROID_LOG_FORMAT": "text",
            # the training job's event stream re-reads the job this often (default 0.5 s: the whole
            # training of the 50 states takes less)
            "CENTROID_EVENT_POLL_SECONDS": "0.05",
        }
    )
    return env


class LocalServer:
    """``centroid serve`` in a subprocess, on a temporary data directory, SQLite and a free port of
    127.0.0.1; ``__enter__`` returns once ``/healthz`` answers, ``__exit__`` stops it (SIGTERM, then
    SIGKILL after ``stop_timeout``) and removes the directory. Its log is ``<dir>/server.log``,
    quoted in the error when it does not start."""

    def __init__(self, start_timeout: float = 60.0, stop_timeout: float = 15.0) -> None:
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.directory = Path(tempfile.mkdtemp(prefix="centroid-workshop-"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.directory / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_in = 0.0  # seconds from the process's start to its first answer
        self._started_at = 0.0

    def start(self) -> None:
        command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self._started_at = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                env=server_environment(self.directory / "data"),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_until_healthy(self, client: CentroidClient) -> None:
        from service.client.http import ClientError

        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while not client.healthy():
            if self.process.poll() is not None:
                raise ClientError(
                    f"the workshop's server exited with code {self.process.returncode} before answering:\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                raise ClientError(
                    f"the workshop's server did not answer {self.url}/healthz within {self.start_timeout:g} s:\n"
                    + self.log_tail()
                )
            time.sleep(0.02)
        self.started_in = time.monotonic() - self._started_at

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
