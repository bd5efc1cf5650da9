"""The ``centroid`` command: serve the API, run a worker, manage the database and keys; and, as a
client over HTTP (``service.client``), run the whole workshop or upload, train, deploy and predict.

Imports that take time (the web app, httpx, rich) happen inside the commands that need them, so
``centroid --help`` stays fast. Exit codes: 0 success, 1 an error from the service (or no service at
the URL, or a job or endpoint that failed), 2 a usage error."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.client.http import CentroidClient
    from service.settings import Settings

DEFAULT_URL = "http://127.0.0.1:8000"  # as service.client.http.DEFAULT_URL (not imported here: httpx is slow)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.settings import get_settings

    settings = get_settings()
    if args.no_worker:
        settings = settings.model_copy(update={"embedded_worker": False})
    if not settings.api_keys and not _is_loopback(args.host):
        print(
            f"refusing to listen on {args.host} with no API keys configured: anyone could use the API. "
            "Set CENTROID_API_KEYS (see `centroid keys create`) or listen on 127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    options: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 30,
        **_http_options(settings),
    }
    _one_blas_thread()
    if args.workers == 1:
        with _metrics_dir(create=False):
            from service.main import create_app

            uvicorn.run(create_app(settings), **options)
        return 0
    return _serve_processes(args.workers, settings, options)


def _one_blas_thread() -> None:
    """API processes serve many requests at once, one core each: idle BLAS threads would spin
    against them (streamed predictions run about 1.5x faster with one). OPENBLAS_NUM_THREADS, when
    set, wins; the worker processes of ``--workers N`` inherit the setting."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def _http_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's httptools protocol with a header size limit and header and body timeouts
    (``service.http_limits``; CENTROID_MAX_HEADER_BYTES, CENTROID_HEADER_TIMEOUT_SECONDS,
    CENTROID_BODY_TIMEOUT_SECONDS, CENTROID_BODY_MIN_BYTES_PER_SECOND). By import string, so the
    processes of ``--workers N`` load it too (and read the same limits from the environment)."""
    from service.http_limits import BoundedHttpToolsProtocol, HttpLimits

    BoundedHttpToolsProtocol.limits = HttpLimits.from_settings(settings)
    return {"http": "service.http_limits:BoundedHttpToolsProtocol"}


def _serve_processes(workers: int, settings: Settings, options: dict[str, Any]) -> int:
    """N uvicorn processes on one socket. Each builds its app from the environment (``service.main:app``),
    so what this command decided travels as environment variables; the schema is brought up to date
    here, once, before they start (N processes migrating a fresh SQLite file at once would collide).
    Only one of them runs the embedded worker (``service.process_role``)."""
    import uvicorn

    from service.logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    _upgrade_database(settings)
    overrides = {} if settings.embedded_worker else {"CENTROID_EMBEDDED_WORKER": "false"}
    with _environment(overrides), _metrics_dir(create=True):
        uvicorn.run("service.main:app", workers=workers, **options)
    return 0


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the processes started inside the block; restore them after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _metrics_dir(create: bool) -> Iterator[None]:
    """prometheus_client's multiprocess directory: the one in PROMETHEUS_MULTIPROC_DIR if set (emptied
    of the previous run's files, as the library requires), else with ``create`` a fresh temporary one,
    exported for the server processes and removed afterwards. (Without either: one process, one
    in-memory registry.)"""
    import tempfile

    from service.metrics import MULTIPROCESS_DIR_ENV

    given = os.environ.get(MULTIPROCESS_DIR_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
        yield
        return
    if not create:
        yield
        return
    path = Path(tempfile.mkdtemp(prefix="centroid-metrics-"))
    try:
        with _environment({MULTIPROCESS_DIR_ENV: str(path)}):
            yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _upgrade_database(settings: Settings) -> str | None:
    """Apply the migrations; return the revision the database is at."""
    from service.db.migrate import current_revision, upgrade_to_head
    from service.db.session import Database

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(settings.resolved_database_url)
    try:
        upgrade_to_head(database.engine)
        return current_revision(database.engine)
    finally:
        database.dispose()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _keys_create(args: argparse.Namespace) -> int:
    import json

    from service.auth import generate_key, hash_key

    key = generate_key()
    entry = {"name": args.name, "scope": args.scope, "sha256": hash_key(key)}
    print(f"API key (give it to the client; it is not stored anywhere): {key}")
    print("Add this entry to the JSON list in CENTROID_API_KEYS:")
    print(json.dumps(entry))
    return 0


def _worker(_: argparse.Namespace) -> int:
    import signal

    from service.logging_setup import configure_logging
    from service.settings import get_settings
    from service.state import build_core, start_up
    from workers.worker import Worker

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    state = build_core(settings)
    start_up(state)
    worker = Worker(state)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.request_shutdown())
    worker.run()
    state.database.dispose()
    return 0


def _db_upgrade(_: argparse.Namespace) -> int:
    from service.settings import get_settings

    print(f"database at revision {_upgrade_database(get_settings())}")
    return 0


# --- client subcommands (over HTTP) ----------------------------------------------------------------


class UsageError(Exception):
    """A command line the command cannot act on (exit code 2), found after argparse's checks."""


def _client_command(run: Callable[[CentroidClient, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap ``run(client, args) -> int`` as a handler: the target from flags or the environment,
    the client opened and closed, a ClientError printed on stderr as exit code 1."""

    def handler(args: argparse.Namespace) -> int:
        from service.client import output
        from service.client.http import CentroidClient, ClientError, resolve_target

        try:
            target = resolve_target(args.url, args.api_key)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        try:
            with CentroidClient.for_target(target) as client:
                return int(run(client, args))
        except ClientError as exc:
            output.error(str(exc))
            return 1

    return handler


def _readable_file(text: str) -> Path:
    path = Path(text)
    if text != "-" and not path.is_file():
        raise UsageError(f"no such file: {text}")
    return path


def _datasets_upload(client: CentroidClient, args: argparse.Namespace) -> int:
    from service.client import output

    path = _readable_file(args.file)
    if args.file == "-":
        raise UsageError("datasets upload needs a file (not -)")
    dataset = client.upload_csv(path, name=args.name or path.stem, key_column=args.key)
    if args.json:
        output.emit_json(dataset)
    else:
        output.show(output.dataset_table(dataset))
    return 0


def _default_job_name(k: int) -> str:
    import secrets
    import time

    return f"train-k{k}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _train(client: CentroidClient, args: argparse.Namespace) -> int:
    from service.client import output

    hyperparameters: dict[str, Any] = {"k": args.k}
    if args.seed is not None:
        hyperparameters["seed"] = args.seed
    if args.init_method:
        hyperparameters["init_method"] = args.init_method
    name = args.name or _default_job_name(args.k)
    job = client.create_training_job(
        {"name": name, "train_dataset_id": args.dataset, "hyperparameters": hyperparameters}
    )
    if args.wait:
        with output.job_progress(name, enabled=not args.json) as bar:
            job = client.wait_for_training_job(name, bar.update if bar is not None else None)
    if args.json:
        output.emit_json(job)
    else:
        output.show(output.job_table(job))
        if job["status"] == "Completed":
            print(f"{name}: Completed; model {job['model_id']}")
        elif not args.wait:
            print(f"{name}: {job['status']} (follow it with `GET /training-jobs/{name}`, or train with --wait)")
    if args.wait and job["status"] != "Completed":
        output.error(f"training job {name} {job['status']}: {job.get('failure_reason') or 'no reason given'}")
        return 1
    return 0


def _deploy(client: CentroidClient, args: argparse.Namespace) -> int:
    from service.client import output

    endpoint = client.create_endpoint({"name": args.name, "model_id": args.model})
    if args.wait:
        endpoint = client.wait_for_endpoint(args.name)
    if args.json:
        output.emit_json(endpoint)
    else:
        output.show(output.endpoint_table(endpoint))
    if args.wait and endpoint["status"] != "InService":
        output.error(
            f"endpoint {args.name} {endpoint['status']}: {endpoint.get('failure_reason') or 'no reason given'}"
        )
        return 1
    return 0


def _number(cell: str) -> float | None:
    import math

    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _read_prediction_csv(path: Path) -> tuple[list[str] | None, list[list[str]], str]:
    """(header or None, data rows, the text). A first row of numbers only means no header."""
    import csv
    import io

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    rows = [row for row in csv.reader(io.StringIO(text)) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise UsageError(f"{path} holds no rows")
    if all(_number(cell) is not None for cell in rows[0]):
        return None, rows, text
    if len(rows) == 1:
        raise UsageError(f"{path} holds a header and no rows")
    return [name.strip() for name in rows[0]], rows[1:], text


def _cell(text: str) -> str | None:
    """A cell as the server reads a CSV upload's: the text itself (numbers are parsed by the server,
    with its rules: thousands separators, quoting; keys stay exact), an empty or blank cell null."""
    return text if text.strip() else None


def _predict(client: CentroidClient, args: argparse.Namespace) -> int:
    from service.client import output

    header, rows, text = _read_prediction_csv(_readable_file(args.file))
    if header is None:
        if args.raw or args.sort:
            raise UsageError("--raw and --sort need a CSV with a header row (a headerless file goes to /invocations)")
        answer = client.invocations_csv(args.endpoint, text)
        if args.json:
            output.emit_json(answer)
        else:
            output.show(output.invocations_table(answer["predictions"]))
        return 0
    records = [dict(zip(header, (_cell(cell) for cell in row), strict=False)) for row in rows]
    body: dict[str, Any] = {"rows": records, "raw": args.raw}
    if args.sort:
        body["sort"] = args.sort
    answer = client.predictions(args.endpoint, body)
    if args.json:
        output.emit_json(answer)
    else:
        output.show(
            output.predictions_table(answer["predictions"], title=f"Predictions of {answer['endpoint']}"),
            output.counts_table(answer["cluster_counts"]),
        )
    return 0


def _assignments(client: CentroidClient, args: argparse.Namespace) -> int:
    from service.client import output

    answer = client.assignments(args.model, cluster=args.cluster, dataset_id=args.dataset)
    if args.json:
        output.emit_json(answer)
        return 0
    rows = [
        {"key": key, "closest_cluster": cluster, "distance_to_cluster": answer["distances"][key]}
        for key, cluster in answer["clusters"].items()
    ]
    rows.sort(key=lambda row: (row["closest_cluster"], row["distance_to_cluster"]))
    output.show(
        output.predictions_table(
            rows,
            title=f"Assignments of {answer['model_id']} ({answer['dataset_id']})",
            key=answer["key_column"] or "Row",
        ),
        output.counts_table(answer["counts"]),
    )
    return 0


def _exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit (143) instead of ending the process at once, so cleanups run."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def _workshop(args: argparse.Namespace) -> int:
    import time

    from service.client.workshop import LocalServer

    started = time.monotonic()
    server: LocalServer | None = None
    if not (args.url or os.environ.get("CENTROID_URL")):
        server = LocalServer()
        server.start()  # first, before loading httpx and rich: the server's start-up is most of the time
        _exit_on_sigterm()  # so that `finally` stops the server when this command is terminated

    from service.client import output
    from service.client.http import CentroidClient, ClientError, Target, resolve_target
    from service.client.workshop import resource_names, run_workshop

    def step(message: str) -> None:
        if not args.json:
            print(f"{time.monotonic() - started:5.2f} s  {message}", file=sys.stderr, flush=True)

    if server is None:
        try:
            target = resolve_target(args.url, args.api_key)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    else:
        target = Target(server.url, None)
    job_name, endpoint_name = resource_names(own_server=server is not None)
    try:
        with CentroidClient.for_target(target) as client:
            if server is not None:
                server.wait_until_healthy(client)
                step(f"started centroid serve at {server.url} (in {server.directory}) in {server.started_in:.2f} s")
            result = run_workshop(client, Path(args.out), job_name=job_name, endpoint_name=endpoint_name, step=step)
    except ClientError as exc:
        output.error(str(exc))
        return 1
    finally:
        if server is not None:
            server.stop()
    result.seconds = {"total": round(time.monotonic() - started, 3)}
    if server is not None:
        result.seconds["server_start"] = round(server.started_in, 3)
        result.url = f"{server.url} (started for the workshop, now stopped)"
    if args.json:
        output.emit_json(result.document())
    else:
        output.show(
            output.predictions_table(result.predictions, title="States by cluster, then distance", key="State"),
            output.counts_table(result.cluster_counts, title="States per cluster", label="States"),
        )
        for message in result.notes + result.plot_errors:
            output.note(message)
        if result.plots:
            print(f"plots: {', '.join(Path(p).name for p in result.plots.values())} in {Path(args.out).resolve()}")
        where = "its own server, started and stopped" if server is not None else result.url
        print(f"workshop done in {result.seconds['total']:.2f} s on {where}")
    return 1 if result.plot_errors else 0


def _client_options(
    url_help: str = f"the service's URL (default: $CENTROID_URL, else {DEFAULT_URL})",
) -> argparse.ArgumentParser:
    """--url, --api-key and --json, shared by every client subcommand."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--url", help=url_help, metavar="URL")
    options.add_argument("--api-key", help="API key sent as a bearer token (default: $CENTROID_API_KEY)", metavar="KEY")
    options.add_argument("--json", action="store_true", help="print one JSON document (for scripts) instead of tables")
    return options


def _add_client_commands(commands: Any) -> None:
    common = _client_options()

    workshop = commands.add_parser(
        "workshop",
        parents=[
            _client_options(
                "a running server's URL (default: $CENTROID_URL; without either, the command starts its own)"
            )
        ],
        help="run the whole workshop (Lab 3) against a server, or one it starts itself",
        description="Upload the crimes and densities tables, scale density to [-1, 1], join on State, train "
        "k = 10, deploy, predict every state, print the states by cluster and distance with the count per "
        "cluster, and save the model's plots. Without --url (or $CENTROID_URL) it starts `centroid serve` on the "
        "embedded defaults (temporary data directory, SQLite, 127.0.0.1, a free port) and stops it at the end.",
    )
    workshop.add_argument(
        "--out",
        default="centroid-workshop",
        metavar="DIR",
        help="where to write the plots (default: ./centroid-workshop/)",
    )
    workshop.set_defaults(handler=_workshop)

    datasets = commands.add_parser("datasets", help="datasets (over HTTP)")
    dataset_commands = datasets.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    upload = dataset_commands.add_parser("upload", parents=[common], help="upload a CSV file as a dataset")
    upload.add_argument("file", metavar="FILE", help="the CSV file (with a header row)")
    upload.add_argument("--key", metavar="COLUMN", help="the column labelling each row (e.g. State)")
    upload.add_argument("--name", help="the dataset's name (default: the file's name without .csv)")
    upload.set_defaults(handler=_client_command(_datasets_upload))

    train = commands.add_parser("train", parents=[common], help="start a training job (k-means on a dataset)")
    train.add_argument("dataset", metavar="DATASET", help="the dataset's id")
    train.add_argument("--k", type=_positive_int, required=True, help="the number of clusters")
    train.add_argument("--name", help="the job's name (default: train-k<K>-<time>-<random>)")
    train.add_argument("--seed", type=int, help="random seed (repeatable results)")
    train.add_argument("--init-method", choices=["random", "kmeans++"], help="how centers are initialised")
    train.add_argument("--wait", action="store_true", help="follow the job to its end, with a progress bar")
    train.set_defaults(handler=_client_command(_train))

    deploy = commands.add_parser("deploy", parents=[common], help="deploy a model to a new endpoint")
    deploy.add_argument("model", metavar="MODEL", help="the model's id")
    deploy.add_argument("--name", required=True, help="the endpoint's name")
    deploy.add_argument("--wait", action="store_true", help="wait until the endpoint is InService (or Failed)")
    deploy.set_defaults(handler=_client_command(_deploy))

    predict = commands.add_parser(
        "predict",
        parents=[common],
        help="assign the rows of a CSV file to clusters",
        description="A CSV with a header row goes to /endpoints/{name}/predictions as rows keyed by column "
        "(the model's key column labels the answers); a headerless CSV of numbers goes to "
        "/endpoints/{name}/invocations as text/csv (SageMaker's contract). FILE may be - for stdin.",
    )
    predict.add_argument("endpoint", metavar="ENDPOINT", help="the endpoint's name")
    predict.add_argument("file", metavar="FILE", help="the CSV file, or - for stdin")
    predict.add_argument("--raw", action="store_true", help="rows are in original units: apply the model's recipe")
    predict.add_argument("--sort", metavar="FIELDS", help="e.g. cluster,distance (fields: key, cluster, distance)")
    predict.set_defaults(handler=_client_command(_predict))

    assignments = commands.add_parser(
        "assignments", parents=[common], help="a model's key → cluster map (its training data by default)"
    )
    assignments.add_argument("model", metavar="MODEL", help="the model's id")
    assignments.add_argument("--cluster", type=int, help="only this cluster's rows")
    assignments.add_argument("--dataset", metavar="ID", help="another dataset's rows instead of the training data")
    assignments.set_defaults(handler=_client_command(_assignments))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="centroid",
        description="Centroid: SageMaker-compatible k-means clustering as a REST service. "
        "Configuration comes from CENTROID_* environment variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP API (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument(
        "--no-worker", action="store_true", help="do not run the embedded worker (run `centroid worker` instead)"
    )
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="number of API processes sharing the port (default: 1); one of them runs the embedded worker",
    )
    serve.set_defaults(handler=_serve)

    worker = commands.add_parser("worker", help="run a background worker (claims jobs, polls SageMaker)")
    worker.set_defaults(handler=_worker)

    keys = commands.add_parser("keys", help="API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="generate a key and print its CENTROID_API_KEYS entry")
    create.add_argument("--name", required=True, help="who or what will use the key")
    create.add_argument("--scope", choices=["read", "admin"], default="read", help="read (default) or admin")
    create.set_defaults(handler=_keys_create)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser("upgrade", help="apply Alembic migrations up to the newest revision")
    upgrade.set_defaults(handler=_db_upgrade)

    _add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"centroid: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
