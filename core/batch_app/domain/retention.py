"""What finished history is deleted, and how: every statement here deletes at most `rows` rows
(found by an index, in key order) and returns how many it deleted, so its caller runs each in a
short transaction of its own and loops until one deletes fewer; none holds a lock a claim waits for.

- A finished batch's request rows, once it has been over for FINISHED_REQUESTS_RETENTION: its
  results live in its output and error files from its end on, the line numbers a retry needs in
  `unsuccessful_lines`, its counts and usage in `batch_progress`. Rows of batches still running
  are never touched.
- Delivered and given-up webhook deliveries, then events with no delivery left, after
  WEBHOOK_DELIVERY_RETENTION.
- Rows of workers stopped for WORKER_HISTORY_RETENTION that hold no request (their backend rows
  go with them), and operators' commands taken as long ago.
- Restart history older than RESTART_HISTORY_RETENTION (at least the restart cap's hour).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

from .statuses import ENDED_WORKER_STATUSES, FINAL_BATCH_STATUSES, DeliveryStatus, RequestStatus, sql_list

# One retention round at a time across every watchdog: a transaction-level lock, which PgBouncer's
# transaction pooling keeps.
_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtext('batch-server retention'))")

# Finished batches whose rows are still there (batches_unpruned holds only those), over for :keep s.
_DUE_BATCHES = f"""
SELECT id FROM batches
WHERE requests_pruned_at IS NULL AND status IN ({sql_list(FINAL_BATCH_STATUSES)})
  AND coalesce(completed_at, failed_at, expired_at, cancelled_at) < now() - make_interval(secs => :keep)
"""
_NEXT_FINISHED_BATCH = text(f"{_DUE_BATCHES} ORDER BY id LIMIT 1")
# The first rows of a batch by line (batch_requests_batch_line), never a running batch's; taken
# as an array of ids, as a claim takes its own (queue._TAKE).
_DELETE_REQUESTS = text(f"""
DELETE FROM batch_requests WHERE id = ANY(ARRAY(
    SELECT r.id FROM batch_requests r JOIN batches b ON b.id = r.batch_id
    WHERE r.batch_id = :batch_id AND b.status IN ({sql_list(FINAL_BATCH_STATUSES)})
    ORDER BY r.line LIMIT :rows))
""")
_MARK_PRUNED = text("UPDATE batches SET requests_pruned_at = now() WHERE id = :batch_id")


@dataclass(frozen=True)
class Rule:
    """One kind of history: its table, which of its rows (`t`) are due once kept `:keep`
    seconds, and the setting that says how long that is."""

    name: str
    table: str
    due: str
    keep_setting: str

    @property
    def delete(self):
        return text(f"DELETE FROM {self.table} WHERE id IN (SELECT id FROM {self.table} t WHERE {self.due} "
                    f"ORDER BY id LIMIT :rows)")

    @property
    def count(self):
        return text(f"SELECT count(*) FROM {self.table} t WHERE {self.due}")


_OLDER = "< now() - make_interval(secs => :keep)"
HISTORY = (
    Rule("webhook deliveries", "webhook_deliveries",
         f"t.status IN ('{DeliveryStatus.DELIVERED}', '{DeliveryStatus.FAILED}') "
         f"AND coalesce(t.delivered_at, t.next_attempt_at) {_OLDER}", "webhook_delivery_retention"),
    Rule("webhook events", "webhook_events",
         f"t.created_at {_OLDER} AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = t.id)",
         "webhook_delivery_retention"),
    Rule("stopped workers", "workers",
         f"t.status IN ({sql_list(ENDED_WORKER_STATUSES)}) AND coalesce(t.stopped_at, t.last_seen) {_OLDER} "
         f"AND NOT EXISTS (SELECT 1 FROM batch_requests r WHERE r.worker_id = t.id AND r.status = '{RequestStatus.RUNNING}')",
         "worker_history_retention"),
    Rule("taken commands", "slot_commands", f"t.taken_at {_OLDER}", "worker_history_retention"),
    Rule("restart history", "worker_restarts", f"t.restarted_at {_OLDER}", "restart_history_retention"),
)
FINISHED_REQUESTS_DUE = text(f"SELECT count(*) FROM batch_requests WHERE batch_id IN ({_DUE_BATCHES})")


def locked(conn: Connection) -> bool:
    """Take the retention lock for this transaction; False while another watchdog holds it."""
    return bool(conn.execute(_LOCK).scalar())


def delete_history(conn: Connection, rule: Rule, keep: float, rows: int) -> int:
    return conn.execute(rule.delete, {"keep": keep, "rows": rows}).rowcount


def due(conn: Connection, settings) -> dict[str, int]:
    """What the next retention round would delete, by kind (rows)."""
    counts = {"finished requests": conn.execute(FINISHED_REQUESTS_DUE,
                                                {"keep": settings.finished_requests_retention}).scalar()}
    for rule in HISTORY:
        counts[rule.name] = conn.execute(rule.count, {"keep": getattr(settings, rule.keep_setting)}).scalar()
    return counts


def next_finished_batch(conn: Connection, keep: float) -> str | None:
    return conn.execute(_NEXT_FINISHED_BATCH, {"keep": keep}).scalar()


def delete_finished_requests(conn: Connection, batch_id: str, rows: int) -> int:
    """Delete up to `rows` of a finished batch's request rows; with none left, mark it pruned."""
    deleted = conn.execute(_DELETE_REQUESTS, {"batch_id": batch_id, "rows": rows}).rowcount
    if deleted < rows:
        conn.execute(_MARK_PRUNED, {"batch_id": batch_id})
    return deleted
