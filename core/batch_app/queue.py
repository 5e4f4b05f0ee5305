"""Every queue protocol in one place: claim, complete, release, rescue, finalize, cancel, expire, notify.

Each function takes an open connection and runs inside the caller's transaction, so a caller
can group several steps atomically. The invariants they keep:
- a request is `running` under exactly one (worker_id, attempt) pair, set by `claim`;
- only that pair can finish it (`complete`), so a stale worker never overwrites a result;
- a batch leaves `in_progress` exactly once, by the conditional update in `start_finalizing`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

UNFINISHED = ("queued", "running")


@dataclass(frozen=True)
class ClaimedRequest:
    id: int
    batch_id: str
    endpoint: str
    custom_id: str
    body: dict[str, Any]
    attempt: int


@dataclass(frozen=True)
class Completion:
    id: int
    attempt: int
    status_code: int
    response: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int


# Requests with attempt > 0 were in flight on a worker that died ("suspects"). They run one at a
# time on an otherwise idle engine, so a request that crashes workers is caught alone and its
# neighbours are never charged with its crashes.
_PICK = """
    SELECT id FROM batch_requests
    WHERE status = 'queued' AND model = :model AND attempt {suspect}
    ORDER BY priority DESC, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
"""

_TAKE = """
UPDATE batch_requests r
SET status = 'running', worker_id = :worker_id, attempt = r.attempt + 1, claimed_at = now()
FROM picked, batches b
WHERE r.id = picked.id AND b.id = r.batch_id
RETURNING r.id, r.batch_id, b.endpoint, r.custom_id, r.body, r.attempt, r.priority
"""

_CLAIM_FRESH = text(f"WITH picked AS ({_PICK.format(suspect='= 0')}) {_TAKE}")
_CLAIM_SUSPECT = text(f"WITH picked AS ({_PICK.format(suspect='> 0')}) {_TAKE}")
_SUSPECTS_WAITING = text("""
SELECT EXISTS (SELECT 1 FROM batch_requests WHERE status = 'queued' AND model = :model AND attempt > 0)
""")

_MARK_IN_PROGRESS = text("""
UPDATE batches SET status = 'in_progress', in_progress_at = now()
WHERE id = ANY(:batch_ids) AND status = 'validating'
""")


def claim(conn: Connection, worker_id: str, model: str, limit: int, engine_idle: bool) -> list[ClaimedRequest]:
    """Take up to `limit` queued requests for `model`, in priority then age order.

    While suspects wait, a busy engine takes nothing new (it drains), and an idle one takes a
    single suspect; `ClaimedRequest.attempt > 1` tells the worker to run it alone.
    """
    if limit <= 0:
        return []
    params = {"worker_id": worker_id, "model": model}
    rows = []
    if conn.execute(_SUSPECTS_WAITING, params).scalar():
        if not engine_idle:
            return []
        rows = conn.execute(_CLAIM_SUSPECT, {**params, "limit": 1}).all()
    if not rows:  # no suspect, or another worker took the last one
        rows = conn.execute(_CLAIM_FRESH, {**params, "limit": limit}).all()
    if rows:
        conn.execute(_MARK_IN_PROGRESS, {"batch_ids": sorted({row.batch_id for row in rows})})
    # UPDATE ... RETURNING has no order: hand requests to the engine in claim order.
    return [ClaimedRequest(row.id, row.batch_id, row.endpoint, row.custom_id, row.body, row.attempt)
            for row in sorted(rows, key=lambda row: (-row.priority, row.id))]


# One statement for a whole group of results; rows this worker no longer owns are skipped.
_COMPLETE = text("""
UPDATE batch_requests r
SET status = CASE WHEN u.status_code = 200 THEN 'succeeded' ELSE 'failed' END,
    status_code = u.status_code, response = u.response,
    prompt_tokens = u.prompt_tokens, completion_tokens = u.completion_tokens, finished_at = now()
FROM json_to_recordset(CAST(:results AS json))
     AS u(id bigint, attempt int, status_code int, response text, prompt_tokens int, completion_tokens int)
WHERE r.id = u.id AND r.worker_id = :worker_id AND r.attempt = u.attempt AND r.status = 'running'
RETURNING r.id, r.batch_id
""")


def complete(conn: Connection, worker_id: str, completions: list[Completion]) -> dict[int, str]:
    """Store results the worker still owns; returns {request id: batch id} of those accepted."""
    if not completions:
        return {}
    # One JSON document rather than a text[] of responses: psycopg escapes every quote of a
    # text array element in Python, which cost more CPU than the rest of the write together.
    results = json.dumps([{
        "id": c.id, "attempt": c.attempt, "status_code": c.status_code,
        # ASCII-escaped: characters such as U+2028 would split a line for many JSONL readers.
        "response": json.dumps(c.response),
        "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
    } for c in completions])
    rows = conn.execute(_COMPLETE, {"worker_id": worker_id, "results": results}).all()
    return {row.id: row.batch_id for row in rows}


# A graceful hand-back (shutdown) does not count as an attempt.
_RELEASE = text("""
UPDATE batch_requests
SET status = 'queued', worker_id = NULL, attempt = attempt - 1, claimed_at = NULL
WHERE id = ANY(:ids) AND worker_id = :worker_id AND status = 'running'
""")


def release(conn: Connection, worker_id: str, request_ids: list[int]) -> int:
    if not request_ids:
        return 0
    released = conn.execute(_RELEASE, {"worker_id": worker_id, "ids": request_ids}).rowcount
    if released:
        announce_work(conn)
    return released


_NO_LONGER_OWNED = text("""
SELECT u.id FROM unnest(CAST(:ids AS bigint[])) AS u(id)
LEFT JOIN batch_requests r ON r.id = u.id AND r.worker_id = :worker_id AND r.status = 'running'
WHERE r.id IS NULL
""")


def no_longer_owned(conn: Connection, worker_id: str, request_ids: list[int]) -> list[int]:
    """Which in-flight requests were taken from this worker (cancelled, expired, rescued)."""
    if not request_ids:
        return []
    return list(conn.execute(_NO_LONGER_OWNED, {"worker_id": worker_id, "ids": request_ids}).scalars())


# --- Rescue: requests of dead workers go back to the queue, or fail as poison. ---

_MARK_SILENT_WORKERS_DEAD = text("""
UPDATE workers SET status = 'dead', stopped_at = now()
WHERE status NOT IN ('dead', 'stopped') AND last_seen < now() - make_interval(secs => :timeout)
RETURNING id
""")

# A worker that stopped cleanly keeps its `stopped`: it handed everything back itself.
_MARK_WORKER_DEAD = text("""
UPDATE workers SET status = 'dead', stopped_at = coalesce(stopped_at, now())
WHERE id = :worker_id AND status NOT IN ('dead', 'stopped')
""")

_RESCUE = text("""
UPDATE batch_requests r
SET status = CASE WHEN r.attempt >= :max_attempts THEN 'failed' ELSE 'queued' END,
    error = CASE WHEN r.attempt >= :max_attempts THEN jsonb_build_object(
        'code', 'poison_request',
        'message', format('This request was in flight on %s workers that died; it is not retried again.',
                          r.attempt))
        END,
    finished_at = CASE WHEN r.attempt >= :max_attempts THEN now() END,
    worker_id = CASE WHEN r.attempt >= :max_attempts THEN r.worker_id END
FROM workers w
WHERE r.status = 'running' AND r.worker_id = w.id AND w.status IN ('dead', 'stopped')
RETURNING r.id, r.batch_id, r.status
""")


def mark_worker_dead(conn: Connection, worker_id: str) -> None:
    conn.execute(_MARK_WORKER_DEAD, {"worker_id": worker_id})


def rescue(conn: Connection, heartbeat_timeout: float, max_attempts: int) -> tuple[int, list[str]]:
    """Declare silent workers dead, then hand their running requests back (or fail poison ones).

    Returns how many requests went back to the queue, and the batches in which a poison request
    failed (those may now be complete: callers follow with `finalize.finalize_ready`).
    """
    conn.execute(_MARK_SILENT_WORKERS_DEAD, {"timeout": heartbeat_timeout})
    rows = conn.execute(_RESCUE, {"max_attempts": max_attempts}).all()
    requeued = sum(1 for row in rows if row.status == "queued")
    if requeued:
        announce_work(conn)
    return requeued, sorted({row.batch_id for row in rows if row.status == "failed"})


# --- Notifications, sent when the transaction commits (never on rollback). ---

# Idle workers LISTEN here rather than poll the queue.
WORK_CHANNEL = "batch_work"
_ANNOUNCE_WORK = text(f"SELECT pg_notify('{WORK_CHANNEL}', '')")

# A batch's unfinished requests were taken away (cancel) or it reached its final status; the
# payload is its id. Busy workers then check what they still own (`no_longer_owned`), and
# retrieves held until the batch ends (the API's `wait`) answer.
BATCH_STATUS_CHANNEL = "batch_status"
_ANNOUNCE_STATUS = text(f"SELECT pg_notify('{BATCH_STATUS_CHANNEL}', :batch_id)")


def announce_work(conn: Connection) -> None:
    """Wake idle workers: requests were queued."""
    conn.execute(_ANNOUNCE_WORK)


def _announce_status(conn: Connection, batch_id: str) -> None:
    conn.execute(_ANNOUNCE_STATUS, {"batch_id": batch_id})


# --- Finalize, cancel, expire: the batch-level transitions. ---

# A batch in one of these has its files and changes no more.
FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")

_START_FINALIZING = text("""
UPDATE batches b SET status = 'finalizing', finalizing_at = now()
WHERE b.id = ANY(:batch_ids) AND b.status = 'in_progress'
  AND NOT EXISTS (SELECT 1 FROM batch_requests r
                  WHERE r.batch_id = b.id AND r.status IN ('queued', 'running'))
RETURNING b.id
""")


def start_finalizing(conn: Connection, batch_ids: list[str]) -> list[str]:
    """Move finished batches to `finalizing`; the caller owns building their files."""
    if not batch_ids:
        return []
    return list(conn.execute(_START_FINALIZING, {"batch_ids": sorted(set(batch_ids))}).scalars())


# Waits for the row rather than skipping it: a competing `start_finalizing` may hold it for an
# instant, and skipping would leave the batch with no builder. The status check after the wait
# makes a second builder a no-op.
_LOCK_FOR_FILES = text("""
SELECT id, status FROM batches
WHERE id = :batch_id AND status IN ('finalizing', 'cancelling')
FOR UPDATE
""")

_FINAL_STATUS = {"finalizing": "completed", "cancelling": "cancelled"}


def lock_for_files(conn: Connection, batch_id: str) -> str | None:
    """Lock a batch waiting for its files; returns the status to end in, or None if not ours."""
    row = conn.execute(_LOCK_FOR_FILES, {"batch_id": batch_id}).first()
    return _FINAL_STATUS[row.status] if row else None


_SET_FINAL = text("""
UPDATE batches SET status = :status, output_file_id = :output_file_id,
       error_file_id = :error_file_id,
       completed_at = CASE WHEN :status = 'completed' THEN now() ELSE completed_at END,
       cancelled_at = CASE WHEN :status = 'cancelled' THEN now() ELSE cancelled_at END,
       expired_at = CASE WHEN :status = 'expired' THEN now() ELSE expired_at END
WHERE id = :batch_id
""")


def set_final(conn: Connection, batch_id: str, status: str, output_file_id: str | None,
              error_file_id: str | None) -> None:
    conn.execute(_SET_FINAL, {"batch_id": batch_id, "status": status,
                              "output_file_id": output_file_id, "error_file_id": error_file_id})
    _announce_status(conn, batch_id)


_STRANDED = text("""
SELECT id FROM batches
WHERE (status = 'finalizing' AND finalizing_at < now() - make_interval(secs => :grace))
   OR (status = 'cancelling' AND cancelling_at < now() - make_interval(secs => :grace))
""")


def stranded_batches(conn: Connection, grace_seconds: float) -> list[str]:
    """Batches whose files nobody built (their builder died): housekeeping finishes them."""
    return list(conn.execute(_STRANDED, {"grace": grace_seconds}).scalars())


_START_CANCEL = text("""
UPDATE batches SET status = 'cancelling', cancelling_at = now()
WHERE id = :batch_id AND status IN ('validating', 'in_progress')
RETURNING id
""")

# Cancelling takes every unfinished request at once, running ones included: the workers
# holding them are notified and abort them, and their late results are refused.
_CANCEL_REQUESTS = text("""
UPDATE batch_requests SET status = 'cancelled', finished_at = now(),
    error = jsonb_build_object('code', 'batch_cancelled',
                               'message', 'The batch was cancelled before this request finished.')
WHERE batch_id = :batch_id AND status IN ('queued', 'running')
""")


def start_cancel(conn: Connection, batch_id: str) -> bool:
    if conn.execute(_START_CANCEL, {"batch_id": batch_id}).first() is None:
        return False
    conn.execute(_CANCEL_REQUESTS, {"batch_id": batch_id})
    _announce_status(conn, batch_id)
    return True


_LOCK_DUE_FOR_EXPIRY = text("""
SELECT id FROM batches
WHERE status IN ('validating', 'in_progress') AND expires_at < now()
ORDER BY expires_at
LIMIT 1
FOR UPDATE SKIP LOCKED
""")

_EXPIRE_REQUESTS = text("""
UPDATE batch_requests SET status = 'expired', finished_at = now(),
    error = jsonb_build_object('code', 'batch_expired',
        'message', 'This request could not be executed before the completion window expired.')
WHERE batch_id = :batch_id AND status IN ('queued', 'running')
""")


def lock_next_expired(conn: Connection) -> str | None:
    """Lock one batch past its window and expire its unfinished requests; returns its id.

    The caller ends it with `set_final` in the same transaction, which notifies the workers.
    """
    batch_id = conn.execute(_LOCK_DUE_FOR_EXPIRY).scalar()
    if batch_id is not None:
        conn.execute(_EXPIRE_REQUESTS, {"batch_id": batch_id})
    return batch_id


# --- Workers: registration and heartbeat. ---

_REGISTER_WORKER = text("""
INSERT INTO workers (id, slot, host, pid, model, gpu_ids, status)
VALUES (:id, :slot, :host, :pid, :model, :gpu_ids, 'loading')
""")

_HEARTBEAT = text("""
UPDATE workers SET last_seen = now(), status = :status, in_flight = :in_flight,
    -- The stall clock runs only while busy: it restarts on progress and on becoming busy.
    last_progress_at = CASE WHEN :progressed OR status <> 'busy' OR :status <> 'busy'
                            THEN now() ELSE last_progress_at END,
    requests_done = :requests_done, tokens_done = :tokens_done,
    stopped_at = CASE WHEN :status = 'stopped' THEN now() END
WHERE id = :id AND status <> 'dead'
RETURNING id
""")


def register_worker(conn: Connection, *, worker_id: str, slot: str, host: str, pid: int,
                    model: str, gpu_ids: str) -> None:
    conn.execute(_REGISTER_WORKER, {"id": worker_id, "slot": slot, "host": host, "pid": pid,
                                    "model": model, "gpu_ids": gpu_ids})


def heartbeat(conn: Connection, *, worker_id: str, status: str, in_flight: int,
              requests_done: int, tokens_done: int, progressed: bool) -> bool:
    """Record liveness; False means this worker was declared dead and must stop (fencing)."""
    row = conn.execute(_HEARTBEAT, {"id": worker_id, "status": status, "in_flight": in_flight,
                                    "requests_done": requests_done, "tokens_done": tokens_done,
                                    "progressed": progressed})
    return row.first() is not None
