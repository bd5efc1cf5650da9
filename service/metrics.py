"""Prometheus metrics, through the standard client library.

Request, invocation and prediction counters live in the API processes. What workers do (jobs by
status, training durations, worker heartbeats) is read from the database at scrape time, so the
numbers are the same whichever API replica is scraped and however many workers run.

One API process (the default, and the tests, which build many apps in one process) keeps its
counters in a registry of its own app. ``centroid serve --workers N`` runs N processes and sets
``PROMETHEUS_MULTIPROC_DIR`` before starting them: prometheus_client's multiprocess mode then keeps
every process's values in files there, and a scrape, whichever process answers it, adds up the
files of all of them (those of processes that have exited too, so totals never go back).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from service.db.session import Database
from service.db.tables import EndpointTable, TrainingJobTable, WorkerTable
from service.db.types import utcnow
from service.statuses import EndpointStatus, JobStatus

TRAINING_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
JOB_STATUSES = tuple(JobStatus)
ENDPOINT_STATUSES = tuple(EndpointStatus)
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Workers whose heartbeat is older are dead and not counted (the default of
# ``Settings.resolved_worker_expiry_seconds``: 3 x the default 60 s lease).
DEFAULT_WORKER_EXPIRY_SECONDS = 180.0


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, when this process runs in it."""
    path = os.environ.get(MULTIPROCESS_DIR_ENV)
    return path if path and os.path.isdir(path) else None


class Metrics:
    """The API's own metrics: one registry per app, or shared files across processes (see above).

    ``observe_request`` and ``record_prediction`` run on every request, so the labelled children
    are looked up once per label combination and kept: a call is a dict lookup and an increment.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, database: Database, *, worker_expiry_seconds: float = DEFAULT_WORKER_EXPIRY_SECONDS) -> None:
        self.multiprocess_dir = multiprocess_dir()
        # In multiprocess mode the metrics write to the shared files and are not registered
        # anywhere (the collector reads them back from the files; registered, they would appear twice).
        own = None if self.multiprocess_dir else CollectorRegistry()
        self.requests = Counter(
            "centroid_http_requests", "HTTP requests served.", ["method", "route", "status"], registry=own
        )
        self.latency = Histogram(
            "centroid_http_request_duration_seconds", "HTTP request latency.", ["method", "route"], registry=own
        )
        self.invocations = Counter(
            "centroid_endpoint_invocations",
            "Endpoint invocations and prediction requests.",
            ["endpoint", "api"],
            registry=own,
        )
        self.rows_predicted = Counter(
            "centroid_rows_predicted", "Rows assigned to clusters.", ["endpoint"], registry=own
        )
        # What a scrape reads: the app's registry, or every process's files; plus the database.
        self.registry = own if own is not None else CollectorRegistry()
        if self.multiprocess_dir:
            MultiProcessCollector(self.registry, path=self.multiprocess_dir)
        self.registry.register(DatabaseCollector(database, worker_expiry_seconds=worker_expiry_seconds))
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._prediction_children: dict[tuple[str, str], tuple[Counter, Counter]] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(method, route))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def record_prediction(self, endpoint: str, api: str, rows: int) -> None:
        key = (endpoint, api)
        children = self._prediction_children.get(key)
        if children is None:
            children = (self.invocations.labels(endpoint, api), self.rows_predicted.labels(endpoint))
            self._prediction_children[key] = children
        children[0].inc()
        children[1].inc(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DatabaseCollector(Collector):
    """Gauges and a histogram computed from the database when Prometheus scrapes.

    Workers count only while their heartbeat is younger than ``worker_expiry_seconds``: a worker
    that died without unregistering (killed, or a shutdown that timed out) drops out of
    ``centroid_workers`` at once, before a live worker deletes its row.
    """

    def __init__(self, database: Database, *, worker_expiry_seconds: float = DEFAULT_WORKER_EXPIRY_SECONDS) -> None:
        self.database = database
        self.worker_expiry_seconds = worker_expiry_seconds

    def collect(self) -> Iterator[Metric]:
        try:
            with self.database.session() as session:
                jobs = dict(
                    session.execute(
                        select(TrainingJobTable.status, func.count()).group_by(TrainingJobTable.status)
                    ).all()
                )
                endpoints = dict(
                    session.execute(select(EndpointTable.status, func.count()).group_by(EndpointTable.status)).all()
                )
                durations = session.scalars(
                    select(TrainingJobTable.training_seconds).where(
                        TrainingJobTable.status == JobStatus.COMPLETED, TrainingJobTable.training_seconds.is_not(None)
                    )
                ).all()
                alive_since = utcnow() - timedelta(seconds=self.worker_expiry_seconds)
                workers = session.execute(
                    select(WorkerTable.id, WorkerTable.heartbeat_at, WorkerTable.last_poll_at).where(
                        WorkerTable.heartbeat_at >= alive_since
                    )
                ).all()
        except SQLAlchemyError:
            yield GaugeMetricFamily("centroid_database_up", "Whether the database answered the scrape.", value=0)
            return
        yield GaugeMetricFamily("centroid_database_up", "Whether the database answered the scrape.", value=1)
        yield _by_status("centroid_training_jobs", "Training jobs by status.", jobs, JOB_STATUSES)
        yield _by_status("centroid_endpoints", "Endpoints by status.", endpoints, ENDPOINT_STATUSES)
        seconds = [float(value) for value in durations if value is not None]
        yield _histogram("centroid_training_duration_seconds", "Training time of completed jobs.", seconds)
        yield from _worker_gauges([(row[0], row[1], row[2]) for row in workers])


def _by_status(name: str, documentation: str, counts: dict[str, int], statuses: tuple[str, ...]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=["status"])
    for status in statuses:
        family.add_metric([status], counts.get(status, 0))
    return family


def _histogram(name: str, documentation: str, values: list[float]) -> Metric:
    buckets = [(str(bound), sum(1 for v in values if v <= bound)) for bound in TRAINING_BUCKETS]
    buckets.append(("+Inf", len(values)))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=float(sum(values)))


def _worker_gauges(workers: list[tuple[str, datetime, datetime | None]]) -> Iterator[Metric]:
    now = utcnow()
    count = GaugeMetricFamily(
        "centroid_workers", "Live workers (heartbeat within the worker expiry).", value=len(workers)
    )
    heartbeat = GaugeMetricFamily(
        "centroid_worker_heartbeat_age_seconds", "Seconds since each worker's last heartbeat.", labels=["worker"]
    )
    poll = GaugeMetricFamily(
        "centroid_worker_last_poll_age_seconds", "Seconds since each worker last polled.", labels=["worker"]
    )
    for worker_id, heartbeat_at, last_poll_at in workers:
        heartbeat.add_metric([worker_id], (now - heartbeat_at).total_seconds())
        if last_poll_at is not None:
            poll.add_metric([worker_id], (now - last_poll_at).total_seconds())
    yield from (count, heartbeat, poll)
