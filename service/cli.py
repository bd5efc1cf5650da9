"""The ``centroid`` command: serve the API, run a worker, manage the database."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
