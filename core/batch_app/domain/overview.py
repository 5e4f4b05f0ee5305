"""Read-only views of the system for operators: `batchctl`, the status page and `/metrics` share them."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection

from .registry import RESET_REASON, restarts_in_last_hour_sql
from .statuses import (
    ENDED_WORKER_STATUSES,
    FINAL_BATCH_STATUSES,
    UNFINISHED_REQUEST_STATUSES,
    BatchStatus,
    RequestStatus,
    sql_list,
)

# The newest process of every slot, with what an operator asks first: alive? how long since its
# last beat? how far has it got? how often, and why last, has it been restarted lately?
_WORKERS = text(f"""
SELECT DISTINCT ON (w.host, w.slot)
       w.slot, w.host, w.pid, w.model, w.status, w.in_flight, w.requests_done, w.tokens_done, w.kind, w.probe,
       w.scheduler_job, w.scheduler_node,
       extract(epoch FROM now() - w.last_seen) AS heartbeat_age,
       {restarts_in_last_hour_sql('w.host', 'w.slot')} AS restarts_last_hour,
       last.reason AS last_restart_reason,
       extract(epoch FROM now() - last.restarted_at) AS last_restart_age
FROM workers w
LEFT JOIN LATERAL (SELECT reason, restarted_at FROM worker_restarts r
                   WHERE r.host = w.host AND r.slot = w.slot ORDER BY restarted_at DESC LIMIT 1) last ON true
ORDER BY w.host, w.slot, w.started_at DESC
""")


def describe_age(seconds: float) -> str:
    """'42 s', '7 min', '3 h': how long ago, as a person reads it."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    return f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"


def describe_allowance(row) -> str:
    """'12 (interactive_within_target: interactive traffic 0.5 s ago)' for a backend of a pool that
    shares its servers with interactive traffic; 'fixed' for one that does not."""
    return "fixed" if row.allowance is None else f"{row.allowance} ({row.allowance_reason})"


def workers(conn: Connection) -> list:
    return conn.execute(_WORKERS).all()


def scheduler_place(row) -> str:
    """'job 4711 on gpu-node-3' for a worker row started in a SLURM job, '' for one that was not."""
    if not row.scheduler_job:
        return ""
    return f"job {row.scheduler_job}" + (f" on {row.scheduler_node}" if row.scheduler_node else "")


_RESTARTS = text("""
SELECT slot, host, reason, exit_code, restarted_at,
       extract(epoch FROM now() - restarted_at) AS age
FROM worker_restarts ORDER BY restarted_at DESC LIMIT :limit
""")


def restart_history(conn: Connection, limit: int = 20) -> list:
    """The latest restarts (and resets) across all slots, newest first."""
    return conn.execute(_RESTARTS, {"limit": limit}).all()


# The backends of live pool workers (a pool worker reports them with its heartbeat).
_BACKENDS = text(f"""
SELECT w.slot, w.host, b.model, b.url, b.state, b.in_flight, b.completed, b.errors, b.last_error,
       extract(epoch FROM now() - b.checked_at) AS checked_age, b.allowance, b.allowance_reason
FROM workers w JOIN backends b ON b.worker_id = w.id
WHERE w.status NOT IN ({sql_list(ENDED_WORKER_STATUSES)})
ORDER BY w.host, w.slot, b.url
""")
# Requests answered and failed tries by backend, over every pool worker that ever ran (counters).
_BACKEND_ANSWERS = text("SELECT url, sum(completed) AS n FROM backends GROUP BY url")
_BACKEND_ERRORS = text("""
SELECT b.url, e.key AS error, sum(e.value::bigint) AS n FROM backends b, jsonb_each_text(b.errors) e GROUP BY 1, 2
""")


def backends(conn: Connection) -> list:
    """The backends of the live pool workers: state, requests in flight and answered, failed
    tries by error type, the last error and the age of the last health check."""
    return conn.execute(_BACKENDS).all()


def backend_totals(conn: Connection) -> tuple[list, list]:
    """(rows of url and requests answered, rows of url, error type and failed tries), summed
    over every pool worker that ever reported the backend."""
    return conn.execute(_BACKEND_ANSWERS).all(), conn.execute(_BACKEND_ERRORS).all()


# --- Counts for /metrics. Label values come from bounded sets: statuses, served models, slots. ---

# Requests by status without reading finished request rows: those still queued or running are
# counted (live work), the finished from each batch's progress, and what a cancelled or expired
# batch did not finish from its total.
_REQUESTS_BY_STATUS = text(f"""
SELECT model, status, count(*) AS n FROM batch_requests
WHERE status IN ({sql_list(UNFINISHED_REQUEST_STATUSES)}) GROUP BY model, status
UNION ALL
SELECT b.model, s.status, sum(s.n) AS n
FROM batches b
JOIN (SELECT batch_id, sum(completed) AS completed, sum(failed) AS failed FROM batch_progress GROUP BY batch_id) p
  ON p.batch_id = b.id
CROSS JOIN LATERAL (VALUES ('{RequestStatus.SUCCEEDED}', p.completed), ('{RequestStatus.FAILED}', p.failed)) s(status, n)
GROUP BY b.model, s.status HAVING sum(s.n) > 0
UNION ALL
SELECT b.model, CASE b.status WHEN '{BatchStatus.CANCELLED}' THEN '{RequestStatus.CANCELLED}'
                ELSE '{RequestStatus.EXPIRED}' END AS status,
       sum(b.total - coalesce(p.done, 0)) AS n
FROM batches b
LEFT JOIN (SELECT batch_id, sum(completed + failed) AS done FROM batch_progress GROUP BY batch_id) p
  ON p.batch_id = b.id
WHERE b.status IN ('{BatchStatus.CANCELLED}', '{BatchStatus.EXPIRED}')
GROUP BY 1, 2 HAVING sum(b.total - coalesce(p.done, 0)) > 0
""")
_BATCHES_BY_STATUS = text("SELECT status, count(*) AS n FROM batches GROUP BY status")
_TOKENS = text("""
SELECT b.model, sum(p.input_tokens) AS prompt, sum(p.output_tokens) AS completion
FROM batch_progress p JOIN batches b ON b.id = p.batch_id GROUP BY b.model
""")
_RESTARTS_BY_SLOT = text(f"SELECT slot, count(*) AS n FROM worker_restarts WHERE reason <> '{RESET_REASON}' "
                         "GROUP BY slot")

# Histograms in one pass each: width_bucket gives every value the number of bounds at or below it.
# Batch rows only: a scrape never reads the requests ever stored.
_QUEUE_WAITS = """
SELECT extract(epoch FROM in_progress_at - created_at) AS seconds FROM batches WHERE in_progress_at IS NOT NULL
"""
_BATCH_DURATIONS = """
SELECT extract(epoch FROM completed_at - created_at) AS seconds FROM batches WHERE completed_at IS NOT NULL
"""
_BUCKETS = """
SELECT width_bucket(seconds, CAST(:bounds AS float8[])) AS below, count(*) AS n, sum(seconds) AS total
FROM ({values}) AS v GROUP BY below
"""


def requests_by_status(conn: Connection) -> list:
    return conn.execute(_REQUESTS_BY_STATUS).all()


def batches_by_status(conn: Connection) -> list:
    return conn.execute(_BATCHES_BY_STATUS).all()


def tokens_by_model(conn: Connection) -> list:
    return conn.execute(_TOKENS).all()


def restarts_by_slot(conn: Connection) -> list:
    return conn.execute(_RESTARTS_BY_SLOT).all()


def queue_wait_histogram(conn: Connection, bounds: list[float]) -> tuple[list[int], float]:
    """Per-bound cumulative counts and the sum of seconds from each batch's creation to its first claim."""
    return _histogram(conn, _QUEUE_WAITS, bounds)


def batch_duration_histogram(conn: Connection, bounds: list[float]) -> tuple[list[int], float]:
    """Per-bound cumulative counts and the sum of seconds from creation to completion of completed batches."""
    return _histogram(conn, _BATCH_DURATIONS, bounds)


def _histogram(conn: Connection, values_sql: str, bounds: list[float]) -> tuple[list[int], float]:
    """Counts for each bound in `bounds` (sorted; the last one +inf) and the sum of all values."""
    rows = conn.execute(text(_BUCKETS.format(values=values_sql)), {"bounds": bounds[:-1]}).all()
    in_bucket = [0] * len(bounds)
    total = 0.0
    for row in rows:
        # A value in bucket `below` (bounds[below - 1] <= v < bounds[below]) counts from bound `below` on.
        in_bucket[row.below] += row.n
        total += float(row.total or 0)
    cumulative, running = [], 0
    for count in in_bucket:
        running += count
        cumulative.append(running)
    return cumulative, total


# --- Storage: what the database holds, for `batchctl storage` and /metrics. ---

# Every table of ours with its indexes and TOAST, and PostgreSQL's estimate of its rows.
_TABLE_BYTES = text("""
SELECT c.relname AS table, pg_total_relation_size(c.oid) AS bytes, greatest(c.reltuples, 0)::bigint AS rows
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND c.relname <> 'alembic_version'
ORDER BY bytes DESC, c.relname
""")
# Request rows of finished batches that retention has not deleted yet, and their bytes.
_FINISHED_HELD = text(f"""
SELECT count(DISTINCT b.id) AS batches, count(r.id) AS rows, coalesce(sum(pg_column_size(r.*)), 0) AS bytes
FROM batches b LEFT JOIN batch_requests r ON r.batch_id = b.id
WHERE b.requests_pruned_at IS NULL AND b.status IN ({sql_list(FINAL_BATCH_STATUSES)})
""")
_OLDEST = text("""
SELECT (SELECT min(created_at) FROM batches) AS batch, (SELECT min(created_at) FROM files) AS file,
       (SELECT min(created_at) FROM webhook_events) AS webhook_event,
       (SELECT min(started_at) FROM workers) AS worker, (SELECT min(restarted_at) FROM worker_restarts) AS restart
""")


def table_bytes(conn: Connection) -> list:
    return conn.execute(_TABLE_BYTES).all()


def finished_held(conn: Connection):
    """(batches, rows, bytes) of finished batches' request rows still in the queue's table."""
    return conn.execute(_FINISHED_HELD).one()


def oldest(conn: Connection) -> dict:
    """When the oldest row of each kind of history was made (None: there is none)."""
    return dict(conn.execute(_OLDEST).one()._mapping)
