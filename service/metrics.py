"""Prometheus metrics, through the standard client library.

Request, invocation and prediction counters live in the API process. What workers do (jobs by
status, training durations, worker heartbeats) is read from the database at scrape time, so the
numbers are the same whichever API replica is scraped and however many workers run.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from service.db.session import Database
from service.db.tables import EndpointTable, TrainingJobTable, WorkerTable
from service.db.types import utcnow

TRAINING_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
JOB_STATUSES = ("Pending", "InProgress", "Completed", "Failed", "Stopping", "Stopped")
ENDPOINT_STATUSES = ("Creating", "Updating", "InService", "Failed", "Deleting")


class Metrics:
    """One registry per app (several apps may live in one test process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, database: Database) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "centroid_http_requests", "HTTP requests served.", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "centroid_http_request_duration_seconds",
            "HTTP request latency.",
            ["method", "route"],
            registry=self.registry,
        )
        self.invocations = Counter(
            "centroid_endpoint_invocations",
            "Endpoint invocations and prediction requests.",
            ["endpoint", "api"],
            registry=self.registry,
        )
        self.rows_predicted = Counter(
            "centroid_rows_predicted", "Rows assigned to clusters.", ["endpoint"], registry=self.registry
        )
        self.registry.register(DatabaseCollector(database))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def record_prediction(self, endpoint: str, api: str, rows: int) -> None:
        self.invocations.labels(endpoint, api).inc()
        self.rows_predicted.labels(endpoint).inc(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DatabaseCollector(Collector):
    """Gauges and a histogram computed from the database when Prometheus scrapes."""

    def __init__(self, database: Database) -> None:
        self.database = database

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
                        TrainingJobTable.status == "Completed", TrainingJobTable.training_seconds.is_not(None)
                    )
                ).all()
                workers = session.execute(
                    select(WorkerTable.id, WorkerTable.heartbeat_at, WorkerTable.last_poll_at)
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
    count = GaugeMetricFamily("centroid_workers", "Workers registered in the database.", value=len(workers))
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
