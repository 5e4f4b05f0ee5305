"""Every queue protocol in one place: claim, complete, release, rescue, finalize, cancel, expire,
end, notify.

Each function takes an open connection and runs inside the caller's transaction, so a caller
can group several steps atomically. The invariants they keep:
- a request is `running` under exactly one (worker_id, attempt) pair, set by `claim`;
- only that pair can finish it (`complete`), so a stale worker never overwrites a result;
- a batch leaves `in_progress` exactly once, by the conditional update in `start_finalizing`;
- a batch reaches a final status only through `end_batch`, from the statuses that may lead there.

Lock order, so that no two of these can deadlock: a batch row before any of its requests, and
requests in id order. Batch rows are locked FOR NO KEY UPDATE, which the foreign-key checks of
rows written after their requests (batch_progress) do not wait for. Cancel and expiry lock the batch, then its unfinished requests; every
statement that changes several requests locks them `ORDER BY id` first. A claim is the one
that takes a batch row after requests, and it never waits for one: it marks a batch
`in_progress` only when nobody holds its row (`_MARK_IN_PROGRESS`), as it takes requests with
SKIP LOCKED.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from . import registry, webhooks
from .statuses import (
    ACTIVE_BATCH_STATUSES,
    ENDED_WORKER_STATUSES,
    UNFINISHED_REQUEST_STATUSES,
    BatchStatus,
    DeathCause,
    RequestStatus,
    sql_list,
)

_UNFINISHED = sql_list(UNFINISHED_REQUEST_STATUSES)
_QUEUED, _RUNNING = RequestStatus.QUEUED, RequestStatus.RUNNING


@dataclass(frozen=True)
class ClaimedRequest:
    id: int
    batch_id: str
    endpoint: str
    custom_id: str
    body: dict[str, Any]
    attempt: int
    crashes: int = 0

    def is_last_attempt(self, max_attempts: int) -> bool:
        """A crash survivor on its last attempt: it runs alone (see _PICK_SUSPECT)."""
        return self.crashes > 0 and self.crashes >= max_attempts - 1


@dataclass(frozen=True)
class Completion:
    id: int
    attempt: int
    status_code: int
    response: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int


# A request queued with crashes > 0 was in flight on a worker that died of a fault that may have
# been its own (see _RESCUE). One with MAX_ATTEMPTS - 1 crashes is a "suspect": were it to crash a worker once more
# it would fail as poison, so it runs alone on an otherwise idle engine, and a request that
# crashes workers is caught alone while its neighbours are never failed for its crashes. Before
# their last attempt, crash survivors run in ordinary groups, so one crash does not slow a
# whole batch down to one request at a time.
_PICK_SUSPECT = f"""
    SELECT id FROM batch_requests
    WHERE status = '{_QUEUED}' AND model = :model AND {{suspects}}
    ORDER BY priority DESC, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
"""

# Workers are shared fairly between projects: priority orders a project's own batches, and a
# claim takes from every project with queued work in turn (round-robin by rank). `waiting` finds
# those projects with one index probe each (a loose scan of the claimable index); each then
# offers up to twice its fair share, so that a project with little work leaves the rest to the
# others, and the claim keeps the first `limit` by rank.
def _ordinary(q: str) -> str:
    """Rows of `q` queued for the model and before their last attempt (those are suspects)."""
    return f"{q}.status = '{_QUEUED}' AND {q}.model = :model AND {q}.crashes < greatest(:last_attempt - 1, 1)"


_PICK_FAIRLY = f"""
waiting(project) AS (
    (SELECT q.project FROM batch_requests q WHERE {_ordinary('q')} ORDER BY q.project LIMIT 1)
    UNION ALL
    SELECT (SELECT q.project FROM batch_requests q WHERE {_ordinary('q')} AND q.project > w.project
            ORDER BY q.project LIMIT 1)
    FROM waiting w WHERE w.project IS NOT NULL),
offered AS (
    SELECT mine.id, w.project, row_number() OVER (PARTITION BY w.project ORDER BY mine.priority DESC, mine.id) AS rank
    FROM (SELECT project, least(:limit, ceil(2.0 * :limit / count(*) OVER ())) AS share
          FROM waiting WHERE project IS NOT NULL) w
    CROSS JOIN LATERAL (
        SELECT q.id, q.priority FROM batch_requests q
        WHERE {_ordinary('q')} AND q.project = w.project
        ORDER BY q.priority DESC, q.id LIMIT w.share FOR UPDATE SKIP LOCKED) mine),
picked AS (SELECT id FROM offered ORDER BY rank, project LIMIT :limit)"""

# A worker declared dead (or stopped) takes nothing: a hung worker woken to be killed would
# otherwise take requests just handed back, and they would be charged its crash twice. Read in
# the statement that takes, with no lock on the worker's row: a death declared while a claim is
# open is never held up by it (the claimant may be stopped or cut off), and what such a claim
# took is rescued, charged once, after it commits.
# The picked ids are read as an array, which the planner always looks up by primary key: joined
# as a table, the plan PostgreSQL keeps for the prepared claim (planned for any limit) hashed them
# against a scan of the whole table, history and all.
_TAKE = f"""
UPDATE batch_requests r
SET status = '{_RUNNING}', worker_id = :worker_id, attempt = r.attempt + 1, claimed_at = now()
FROM batches b
WHERE r.id = ANY(ARRAY(SELECT id FROM picked)) AND b.id = r.batch_id
  AND EXISTS (SELECT 1 FROM workers w WHERE w.id = :worker_id
              AND w.status NOT IN ({sql_list(ENDED_WORKER_STATUSES)}))
RETURNING r.id, r.batch_id, b.endpoint, r.custom_id, r.body, r.attempt, r.crashes, r.priority, r.project
"""

# `crashes > 0` spelled out lets the suspects' partial index serve the suspect statements.
_SUSPECT = "crashes > 0 AND crashes >= :last_attempt - 1"
_CLAIM_ORDINARY = text(f"WITH RECURSIVE {_PICK_FAIRLY} {_TAKE}")
_CLAIM_SUSPECT = text(f"WITH picked AS ({_PICK_SUSPECT.format(suspects=_SUSPECT)}) {_TAKE}")
_SUSPECTS_WAITING = text(f"""
SELECT EXISTS (SELECT 1 FROM batch_requests WHERE status = '{_QUEUED}' AND model = :model AND {_SUSPECT})
""")

# Skips a batch whose row someone holds: a cancel or an expiry about to end it, or another claim
# marking it already. Waiting here while holding claimed requests could deadlock with them.
_MARK_IN_PROGRESS = text(f"""
UPDATE batches SET status = '{BatchStatus.IN_PROGRESS}', in_progress_at = now()
WHERE id IN (SELECT id FROM batches WHERE id = ANY(:batch_ids) AND status = '{BatchStatus.VALIDATING}'
             FOR NO KEY UPDATE SKIP LOCKED)
""")


def claim(conn: Connection, worker_id: str, model: str, limit: int, engine_idle: bool,
          max_attempts: int) -> list[ClaimedRequest]:
    """Take up to `limit` queued requests for `model`, in priority then age order; a worker
    that is no longer serving (declared dead, stopped) takes none.

    While suspects wait, a busy engine takes nothing new (it drains), and an idle one takes a
    single suspect; `is_last_attempt` tells the worker to run it alone.
    """
    if limit <= 0:
        return []
    params = {"worker_id": worker_id, "model": model, "last_attempt": max_attempts}
    rows = []
    if conn.execute(_SUSPECTS_WAITING, params).scalar():
        if not engine_idle:
            return []
        rows = conn.execute(_CLAIM_SUSPECT, {**params, "limit": 1}).all()
    if not rows:  # no suspect, or another worker took the last one
        rows = conn.execute(_CLAIM_ORDINARY, {**params, "limit": limit}).all()
    # Rows are read as tuples, in _TAKE's RETURNING order: by column name, reading a thousand
    # rows cost a fifth of the claim's time in the worker.
    if rows:
        conn.execute(_MARK_IN_PROGRESS, {"batch_ids": sorted({row[1] for row in rows})})
    # UPDATE ... RETURNING has no order: hand requests to the engine in claim order.
    return [ClaimedRequest(id_, batch_id, endpoint, custom_id, body, attempt, crashes)
            for id_, batch_id, endpoint, custom_id, body, attempt, crashes, _, _
            in sorted(rows, key=lambda row: (-row[7], row[0]))]


# Counts what the `done` rows of a statement finished into batch_progress (a batch's
# request_counts and usage), a row per batch and worker, upserted in key order: the rows a
# statement locks last, after its requests (see the lock order above).
_SUCCEEDED, _FAILED = RequestStatus.SUCCEEDED, RequestStatus.FAILED
_COUNT = f"""counted AS (
    INSERT INTO batch_progress AS p (batch_id, worker_id, completed, failed, input_tokens, output_tokens)
    SELECT batch_id, worker_id, count(*) FILTER (WHERE status = '{_SUCCEEDED}'),
           count(*) FILTER (WHERE status = '{_FAILED}'), sum(prompt_tokens), sum(completion_tokens)
    FROM done WHERE status IN ('{_SUCCEEDED}', '{_FAILED}')
    GROUP BY batch_id, worker_id ORDER BY batch_id, worker_id
    ON CONFLICT (batch_id, worker_id) DO UPDATE
    SET completed = p.completed + excluded.completed, failed = p.failed + excluded.failed,
        input_tokens = p.input_tokens + excluded.input_tokens, output_tokens = p.output_tokens + excluded.output_tokens)"""
_DONE_COLUMNS = "r.id, r.batch_id, r.worker_id, r.status, r.prompt_tokens, r.completion_tokens"

# One statement for a whole group of results; rows this worker no longer owns are skipped. The
# rows are locked in id order first (see the lock order above).
_COMPLETE = text(f"""
WITH u AS (SELECT * FROM json_to_recordset(CAST(:results AS json))
     AS u(id bigint, attempt int, status_code int, response text, prompt_tokens int, completion_tokens int)),
owned AS (SELECT r.id FROM batch_requests r JOIN u ON u.id = r.id
          WHERE r.worker_id = :worker_id AND r.attempt = u.attempt AND r.status = '{_RUNNING}'
          ORDER BY r.id FOR UPDATE OF r),
done AS (UPDATE batch_requests r
    SET status = CASE WHEN u.status_code = 200 THEN '{_SUCCEEDED}' ELSE '{_FAILED}' END,
        status_code = u.status_code, response = u.response,
        prompt_tokens = u.prompt_tokens, completion_tokens = u.completion_tokens, finished_at = now(),
        finished_xid = pg_current_xact_id()::text::bigint
    FROM owned, u
    WHERE r.id = owned.id AND u.id = owned.id
    RETURNING {_DONE_COLUMNS}),
{_COUNT}
SELECT id, batch_id FROM done
""")


# The largest answer stored for one request (BACKEND_MAX_REPLY_BYTES' default): a larger one is
# that request's error, whichever engine made it.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


def complete(conn: Connection, worker_id: str, completions: list[Completion],
             max_response_bytes: int = MAX_RESPONSE_BYTES) -> dict[int, str]:
    """Store results the worker still owns; returns {request id: batch id} of those accepted."""
    if not completions:
        return {}
    # One JSON document rather than a text[] of responses: psycopg escapes every quote of a
    # text array element in Python, which cost more CPU than the rest of the write together.
    results = json.dumps([{
        "id": c.id, "attempt": c.attempt, **_answer(c, max_response_bytes),
        "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
    } for c in completions])
    return dict(conn.execute(_COMPLETE, {"worker_id": worker_id, "results": results}).all())


# The succeeded lines of a batch in the order their results were stored, after the first
# `after` of them. Only results of transactions older than every transaction still running are
# listed: any result stored later comes from a newer transaction and sorts after them, so the
# list only ever grows at its end and `after` resumes it exactly.
# The page is chosen on narrow rows, then its responses are read by id in that order: sorting
# the responses themselves (embeddings are tens of KB each) would spill to disk.
_FINISHED_SO_FAR = text(f"""
SELECT r.line, r.custom_id, r.attempt, r.status_code, r.response
FROM (SELECT id, finished_xid FROM batch_requests
      WHERE batch_id = :batch_id AND status = '{_SUCCEEDED}'
        AND finished_xid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint
      ORDER BY finished_xid, id OFFSET :after LIMIT :limit) page
CROSS JOIN LATERAL (SELECT * FROM batch_requests WHERE id = page.id) r
ORDER BY page.finished_xid, page.id
""")


def finished_so_far(conn: Connection, batch_id: str, after: int, limit: int) -> Iterator:
    """Those rows, read a few hundred at a time (a page may be cut short by its size)."""
    return conn.execute(_FINISHED_SO_FAR.execution_options(stream_results=True, yield_per=256),
                        {"batch_id": batch_id, "after": after, "limit": limit})


# A graceful hand-back (shutdown) does not count as an attempt.
_RELEASE = text(f"""
UPDATE batch_requests
SET status = '{_QUEUED}', worker_id = NULL, attempt = attempt - 1, claimed_at = NULL
WHERE id IN (SELECT id FROM batch_requests WHERE id = ANY(:ids) AND worker_id = :worker_id
             AND status = '{_RUNNING}' ORDER BY id FOR UPDATE)
""")


def release(conn: Connection, worker_id: str, request_ids: list[int]) -> int:
    if not request_ids:
        return 0
    released = conn.execute(_RELEASE, {"worker_id": worker_id, "ids": request_ids}).rowcount
    if released:
        announce_work(conn)
    return released


_NO_LONGER_OWNED = text(f"""
SELECT u.id FROM unnest(CAST(:ids AS bigint[])) AS u(id)
LEFT JOIN batch_requests r ON r.id = u.id AND r.worker_id = :worker_id AND r.status = '{_RUNNING}'
WHERE r.id IS NULL
""")


def _answer(completion: Completion, max_bytes: int) -> dict[str, Any]:
    """Its status code and response as JSON text; NaN or Infinity, which JSON cannot carry, make
    it an error rather than an output line no JSON reader would accept, and so does an answer
    larger than `max_bytes` (prompt_logprobs, echo or n can make one of hundreds of MB), which
    would otherwise weigh on the database, the output file and every download."""
    try:
        # ASCII-escaped: characters such as U+2028 would split a line for many JSONL readers.
        response = json.dumps(completion.response, allow_nan=False)
    except ValueError:
        return _server_error("The engine answered with NaN or Infinity, which JSON cannot carry.", "result_not_json")
    if len(response) > max_bytes:
        return _server_error(f"The answer to this request is larger than {max_bytes} bytes (BACKEND_MAX_REPLY_BYTES); "
                             "ask for less (max_tokens, n, logprobs).", "response_too_large", status_code=502)
    return {"status_code": completion.status_code, "response": response}


def _server_error(message: str, code: str, status_code: int = 500) -> dict[str, Any]:
    return {"status_code": status_code, "response": json.dumps({"error": {
        "message": message, "type": "server_error", "param": None, "code": code}})}


_HELD_BY = text(f"SELECT id FROM batch_requests WHERE worker_id = :worker_id AND status = '{_RUNNING}'")


def held_by(conn: Connection, worker_id: str) -> list[int]:
    """Every request running under this worker, as the database sees it."""
    return list(conn.execute(_HELD_BY, {"worker_id": worker_id}).scalars())


def no_longer_owned(conn: Connection, worker_id: str, request_ids: list[int]) -> list[int]:
    """Which in-flight requests were taken from this worker (cancelled, expired, rescued)."""
    if not request_ids:
        return []
    return list(conn.execute(_NO_LONGER_OWNED, {"worker_id": worker_id, "ids": request_ids}).scalars())


# --- Rescue: requests of dead workers go back to the queue, or fail as poison. ---

# The deaths a request may have caused, which charge a crash to each request the worker held: an
# exception, a crash signal, an OOM kill, and a hang, a stall or a failed start seen by its own
# host's watchdog while that host lived. A worker lost together with its host (its watchdog silent
# too: a power loss, a cut link), killed from outside, fenced, drained, abandoned by a previous
# watchdog or silent with nobody judging it charges nothing, and neither does a dead worker with
# no recorded cause. Each run still counts in `attempt`.
CHARGED_DEATHS = (DeathCause.EXITED, DeathCause.CRASH_SIGNAL, DeathCause.OOM_KILLED, DeathCause.HUNG,
                  DeathCause.STALLED, DeathCause.FAILED_TO_START)

# `host_losses` counts the runs in a row that ended with the host lost; any other death ends the row.
_RESCUE = text(f"""
WITH orphaned AS (SELECT r.id, r.worker_id, death.charged, death.host_lost,
                         death.charged AND r.crashes + 1 >= :max_attempts AS poisoned
                  FROM batch_requests r JOIN workers w ON w.id = r.worker_id
                  LEFT JOIN worker_deaths d ON d.worker_id = r.worker_id
                  CROSS JOIN LATERAL (SELECT coalesce(d.cause IN ({sql_list(CHARGED_DEATHS)}), false) AS charged,
                                             coalesce(d.cause = '{DeathCause.HOST_SILENT}', false) AS host_lost) death
                  WHERE r.status = '{_RUNNING}' AND w.status IN ({sql_list(ENDED_WORKER_STATUSES)})
                  ORDER BY r.id FOR UPDATE OF r),
done AS (UPDATE batch_requests r
    SET status = CASE WHEN o.poisoned THEN '{_FAILED}' ELSE '{_QUEUED}' END,
        crashes = r.crashes + o.charged::int,
        host_losses = CASE WHEN o.host_lost THEN r.host_losses + 1 ELSE 0 END,
        error = CASE WHEN o.poisoned THEN jsonb_build_object(
            'code', 'poison_request',
            'message', format('This request was in flight on %s workers that crashed; it is not retried again.',
                              r.crashes + 1))
            END,
        finished_at = CASE WHEN o.poisoned THEN now() END,
        worker_id = CASE WHEN o.poisoned THEN r.worker_id END
    FROM orphaned o
    WHERE r.id = o.id
    RETURNING {_DONE_COLUMNS}, r.custom_id, r.host_losses),
{_COUNT},
held AS (UPDATE worker_deaths d SET requests = d.requests + n.requests
         FROM (SELECT worker_id, count(*) AS requests FROM orphaned GROUP BY worker_id ORDER BY worker_id) n
         WHERE d.worker_id = n.worker_id)
SELECT id, batch_id, custom_id, status, host_losses FROM done
""")


@dataclass(frozen=True)
class Rescued:
    requeued: int  # requests back in the queue
    poisoned_batches: list[str]  # where a poison request failed: those may now be complete
    lost_with_hosts: list  # (id, batch_id, custom_id, host_losses) of those whose host was just lost


def rescue(conn: Connection, heartbeat_timeout: float | None, max_attempts: int, host: str) -> Rescued:
    """Declare workers silent for `heartbeat_timeout` dead (None: leave silence unjudged), as seen
    from `host`, then hand the running requests of dead workers back (or fail poison ones).
    Callers follow with `finalize.finalize_ready` on the poisoned batches."""
    if heartbeat_timeout is not None:
        registry.mark_silent_workers_dead(conn, heartbeat_timeout, host)
    rows = conn.execute(_RESCUE, {"max_attempts": max_attempts}).all()
    requeued = sum(1 for row in rows if row.status == _QUEUED)
    if requeued:
        announce_work(conn)
    return Rescued(requeued, sorted({row.batch_id for row in rows if row.status == RequestStatus.FAILED}),
                   [row for row in rows if row.host_losses > 0])


# --- Notifications, sent when the transaction commits (never on rollback). ---

# Idle workers LISTEN here rather than poll the queue.
WORK_CHANNEL = "batch_work"
_ANNOUNCE_WORK = text(f"SELECT pg_notify('{WORK_CHANNEL}', '')")

# A batch's unfinished requests were taken from their workers (cancel); the payload is its id.
# Busy workers then check what they still own (`no_longer_owned`).
WORK_TAKEN_CHANNEL = "batch_work_taken"
# A batch reached its final status (`end_batch`, which also takes its unfinished requests); the
# payload is its id. Busy workers check what they still own, and retrieves held until the batch
# ends (the API's `wait`) answer.
BATCH_ENDED_CHANNEL = "batch_ended"
_NOTIFY = text("SELECT pg_notify(:channel, :batch_id)")


def announce_work(conn: Connection) -> None:
    """Wake idle workers: requests were queued."""
    conn.execute(_ANNOUNCE_WORK)


def _notify(conn: Connection, channel: str, batch_id: str) -> None:
    conn.execute(_NOTIFY, {"channel": channel, "batch_id": batch_id})


# --- Finalize, cancel, expire, end: the batch-level transitions. ---

_START_FINALIZING = text(f"""
UPDATE batches b SET status = '{BatchStatus.FINALIZING}', finalizing_at = now()
WHERE b.id = ANY(:batch_ids) AND b.status IN ({sql_list(ACTIVE_BATCH_STATUSES)}) AND b.total > 0
  AND NOT EXISTS (SELECT 1 FROM batch_requests r
                  WHERE r.batch_id = b.id AND r.status IN ({_UNFINISHED}))
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
_LOCK_FOR_FILES = text(f"""
SELECT id, status FROM batches
WHERE id = :batch_id AND status IN ('{BatchStatus.FINALIZING}', '{BatchStatus.CANCELLING}')
FOR NO KEY UPDATE
""")

_FINAL_STATUS = {BatchStatus.FINALIZING: BatchStatus.COMPLETED, BatchStatus.CANCELLING: BatchStatus.CANCELLED}


def lock_for_files(conn: Connection, batch_id: str) -> BatchStatus | None:
    """Lock a batch waiting for its files; returns the status to end in, or None if not ours."""
    row = conn.execute(_LOCK_FOR_FILES, {"batch_id": batch_id}).first()
    return _FINAL_STATUS[BatchStatus(row.status)] if row else None


_STRANDED = text(f"""
SELECT id FROM batches
WHERE (status = '{BatchStatus.FINALIZING}' AND finalizing_at < now() - make_interval(secs => :grace))
   OR (status = '{BatchStatus.CANCELLING}' AND cancelling_at < now() - make_interval(secs => :grace))
""")


def stranded_batches(conn: Connection, grace_seconds: float) -> list[str]:
    """Batches whose files nobody built (their builder died): housekeeping finishes them."""
    return list(conn.execute(_STRANDED, {"grace": grace_seconds}).scalars())


_DONE_BUT_IN_PROGRESS = text(f"""
SELECT b.id FROM batches b
WHERE b.status IN ({sql_list(ACTIVE_BATCH_STATUSES)}) AND b.total > 0
  AND NOT EXISTS (SELECT 1 FROM batch_requests r WHERE r.batch_id = b.id AND r.status IN ({_UNFINISHED}))
""")


def done_but_in_progress(conn: Connection) -> list[str]:
    """Batches with nothing left to run that never started finalizing (whoever stored their last
    result died before finalizing, or lost the answer to its write; or a claim skipped marking a
    batch in progress because a claim that rolled back held it): housekeeping finalizes them."""
    return list(conn.execute(_DONE_BUT_IN_PROGRESS).scalars())


_START_CANCEL = text(f"""
UPDATE batches SET status = '{BatchStatus.CANCELLING}', cancelling_at = now()
WHERE id = :batch_id AND status IN ({sql_list(ACTIVE_BATCH_STATUSES)})
RETURNING id
""")

# Cancelling takes every unfinished request at once, running ones included: the workers
# holding them are notified and abort them, and their late results are refused.
# The unfinished requests of a batch, locked in id order (see the lock order above); taken as an
# array of ids, for the reason _TAKE gives.
_UNFINISHED_OF_BATCH = f"""SELECT id FROM batch_requests WHERE batch_id = :batch_id AND status IN ({_UNFINISHED})
                 ORDER BY id FOR UPDATE"""

_CANCEL_REQUESTS = text(f"""
UPDATE batch_requests SET status = '{RequestStatus.CANCELLED}', finished_at = now(),
    error = jsonb_build_object('code', 'batch_cancelled',
                               'message', 'The batch was cancelled before this request finished.')
WHERE id = ANY(ARRAY({_UNFINISHED_OF_BATCH}))
""")


def start_cancel(conn: Connection, batch_id: str) -> bool:
    if conn.execute(_START_CANCEL, {"batch_id": batch_id}).first() is None:
        return False
    conn.execute(_CANCEL_REQUESTS, {"batch_id": batch_id})
    _notify(conn, WORK_TAKEN_CHANNEL, batch_id)
    return True


_LOCK_DUE_FOR_EXPIRY = text(f"""
SELECT id FROM batches
WHERE status IN ({sql_list(ACTIVE_BATCH_STATUSES)}) AND expires_at < now()
ORDER BY expires_at
LIMIT 1
FOR NO KEY UPDATE SKIP LOCKED
""")

_EXPIRE_REQUESTS = text(f"""
UPDATE batch_requests SET status = '{RequestStatus.EXPIRED}', finished_at = now(),
    error = jsonb_build_object('code', 'batch_expired',
        'message', 'This request could not be executed before the completion window expired.')
WHERE id = ANY(ARRAY({_UNFINISHED_OF_BATCH}))
""")


def lock_next_expired(conn: Connection) -> str | None:
    """Lock one batch past its window and expire its unfinished requests; returns its id.

    The caller ends it with `end_batch` in the same transaction, which notifies the workers.
    """
    batch_id = conn.execute(_LOCK_DUE_FOR_EXPIRY).scalar()
    if batch_id is not None:
        conn.execute(_EXPIRE_REQUESTS, {"batch_id": batch_id})
    return batch_id


# The one way into a final status, and the statuses each may be reached from.
ENDS_FROM = {
    BatchStatus.COMPLETED: (BatchStatus.FINALIZING,),
    BatchStatus.CANCELLED: (BatchStatus.CANCELLING,),
    BatchStatus.EXPIRED: ACTIVE_BATCH_STATUSES,
    BatchStatus.FAILED: (BatchStatus.VALIDATING,),  # its input file was refused
}

# Each final status stamps its own timestamp, named after it (OpenAI's `completed_at`...).
_STAMP_FINAL_TIME = ",\n       ".join(f"{status}_at = CASE WHEN :status = '{status}' THEN now() ELSE {status}_at END"
                                    for status in ENDS_FROM)
_END_BATCH = text(f"""
UPDATE batches SET status = :status, output_file_id = :output_file_id, error_file_id = :error_file_id,
       errors = coalesce(CAST(:errors AS jsonb), errors),
       {_STAMP_FINAL_TIME}
WHERE id = :batch_id AND status = ANY(:from_statuses)
RETURNING id, project
""")


def end_batch(conn: Connection, batch_id: str, status: BatchStatus, *, output_file_id: str | None = None,
              error_file_id: str | None = None, errors: list[dict] | None = None) -> bool:
    """Give a batch its final status, files and (for a refused input file) errors, and notify.

    Conditional on the batch being in a status that leads there (`ENDS_FROM`): False, and
    nothing changed, when it was ended already or is not ready.
    """
    ended = conn.execute(_END_BATCH, {
        "batch_id": batch_id, "status": status, "from_statuses": list(ENDS_FROM[status]),
        "output_file_id": output_file_id, "error_file_id": error_file_id,
        "errors": json.dumps({"object": "list", "data": errors}) if errors is not None else None,
    }).first()
    if ended is not None:
        webhooks.record_batch_event(conn, ended.project, batch_id, status)  # delivered at least once
        _notify(conn, BATCH_ENDED_CHANNEL, batch_id)
    return ended is not None
