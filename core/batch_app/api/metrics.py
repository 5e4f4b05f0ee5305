"""`GET /metrics` in Prometheus text format, read from the database at scrape time.

The database is the one place that knows every worker, batch and request whichever process
handled them, so any API server answers for the whole stack and nothing is lost on a restart.
Labels take only bounded values: statuses, served model names and configured worker slots.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from ..database import Database
from ..domain import overview
from ..domain.statuses import WorkerStatus

router = APIRouter()

QUEUE_WAIT_BOUNDS = [1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, float("inf")]
BATCH_DURATION_BOUNDS = [10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, float("inf")]


class DatabaseCollector:
    def __init__(self, db: Database):
        self.db = db

    def collect(self):
        with self.db.connect() as conn:
            yield _labelled(GaugeMetricFamily("batch_requests", "Requests by status and model.",
                                              labels=["model", "status"]),
                            [((row.model, row.status), row.n) for row in overview.requests_by_status(conn)])
            yield _labelled(GaugeMetricFamily("batches", "Batches by status.", labels=["status"]),
                            [((row.status,), row.n) for row in overview.batches_by_status(conn)])
            tokens = CounterMetricFamily("batch_tokens", "Tokens of finished requests by model and kind.",
                                         labels=["model", "kind"])
            for row in overview.tokens_by_model(conn):
                tokens.add_metric([row.model, "prompt"], row.prompt)
                tokens.add_metric([row.model, "generated"], row.completion)
            yield tokens
            yield from _worker_metrics(overview.workers(conn))
            yield _labelled(CounterMetricFamily("batch_worker_restarts", "Worker restarts by the watchdog.",
                                                labels=["slot"]),
                            [((row.slot,), row.n) for row in overview.restarts_by_slot(conn)])
            yield from _backend_metrics(overview.backends(conn), *overview.backend_totals(conn))
            yield _labelled(GaugeMetricFamily("batch_database_bytes", "Bytes of each table with its indexes.",
                                              labels=["table"]),
                            [((row.table,), row.bytes) for row in overview.table_bytes(conn)])
            yield _histogram("batch_queue_wait_seconds", "Time from a batch's creation to its first claim.",
                             QUEUE_WAIT_BOUNDS, *overview.queue_wait_histogram(conn, QUEUE_WAIT_BOUNDS))
            yield _histogram("batch_duration_seconds", "Time from creation to completion of completed batches.",
                             BATCH_DURATION_BOUNDS, *overview.batch_duration_histogram(conn, BATCH_DURATION_BOUNDS))


def _labelled(family, samples):
    for labels, value in samples:
        family.add_metric(list(labels), value)
    return family


def _worker_metrics(rows):
    # A server slot (kind "server") beats with each passed health check; its in-flight count is
    # what its pool workers hold on it.
    age = GaugeMetricFamily("batch_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat.",
                            labels=["slot", "model", "kind"])
    status = GaugeMetricFamily("batch_worker_status", "1 for the worker's current status.",
                               labels=["slot", "model", "kind", "status"])
    in_flight = GaugeMetricFamily("batch_worker_in_flight", "Requests held by the worker's engine.",
                                  labels=["slot", "model", "kind"])
    for row in rows:
        age.add_metric([row.slot, row.model, row.kind], float(row.heartbeat_age))
        in_flight.add_metric([row.slot, row.model, row.kind], row.in_flight)
        for name in WorkerStatus:
            status.add_metric([row.slot, row.model, row.kind, name], 1.0 if row.status == name else 0.0)
    return age, status, in_flight


def _backend_metrics(live, answers, errors):
    """Pool backends, labelled by their configured URL."""
    up = GaugeMetricFamily("batch_backend_up", "1 while the backend passes its health checks.",
                           labels=["slot", "backend"])
    for row in live:
        up.add_metric([row.slot, row.url], 1.0 if row.state == "healthy" else 0.0)
    yield up
    # The reason's kind (a handful of words, engines/batch_allowance.py), not its detail.
    yield _labelled(GaugeMetricFamily(
        "batch_backend_allowance", "Batch requests the backend may hold while it serves interactive traffic too.",
        labels=["slot", "backend", "reason"]),
        [((row.slot, row.url, row.allowance_reason.split(":")[0]), row.allowance) for row in live
         if row.allowance is not None])
    yield _labelled(CounterMetricFamily("batch_backend_requests", "Requests the backend answered.",
                                        labels=["backend"]), [((row.url,), row.n) for row in answers])
    yield _labelled(CounterMetricFamily("batch_backend_errors", "Failed tries on the backend by error type.",
                                        labels=["backend", "error"]), [((row.url, row.error), row.n) for row in errors])


def _histogram(name: str, documentation: str, bounds: list[float], cumulative: list[int], total: float):
    buckets = [(floatToGoString(bound), count) for bound, count in zip(bounds, cumulative, strict=True)]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


def metrics_registry(db: Database) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(db))
    return registry


@router.get("/metrics", tags=["system"], include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
