"""The worker registry: the `workers` and `worker_restarts` tables, read and written by every
process. A worker registers and beats here; the watchdog finds its workers' states, records
restarts and counts them against the hourly cap; the API asks which models are served. A pool
worker also reports its backends (the `backends` table). A server slot's row is written by the
watchdog that runs it (`kind` server): registered at its start and beaten by the watchdog's
health check of it, with the load its pool workers report on it.

A worker row is one process start, under an id the watchdog chose for it. The restart count
of a slot is the one query `RESTARTS_IN_LAST_HOUR`: restarts of the last hour since the slot's
latest `batchctl worker reset`. A dead worker's cause is a row of `worker_deaths`; each host's
watchdog beats in `hosts`, which tells a worker lost with its host from a hung one.
"""

from __future__ import annotations

import json

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..slurm.job import this_job
from .statuses import (
    ENDED_WORKER_STATUSES,
    SERVING_WORKER_STATUSES,
    DeathCause,
    SlotCommand,
    SlotKind,
    WorkerStatus,
    sql_list,
)

_ENDED = sql_list(ENDED_WORKER_STATUSES)

# --- Registration and heartbeat, by the worker itself. ---

_REGISTER = text(f"""
INSERT INTO workers (id, slot, host, pid, model, gpu_ids, status, kind, scheduler_job, scheduler_node)
VALUES (:id, :slot, :host, :pid, :model, :gpu_ids, '{WorkerStatus.LOADING}', :kind, :scheduler_job, :scheduler_node)
""")

_HEARTBEAT = text(f"""
UPDATE workers SET last_seen = now(), status = :status, in_flight = :in_flight,
    -- The stall clock runs only while busy: it restarts on progress and on becoming busy.
    last_progress_at = CASE WHEN :progressed OR status <> '{WorkerStatus.BUSY}' OR :status <> '{WorkerStatus.BUSY}'
                            THEN now() ELSE last_progress_at END,
    requests_done = :requests_done, tokens_done = :tokens_done,
    stopped_at = CASE WHEN :status = '{WorkerStatus.STOPPED}' THEN now() END
WHERE id = :id AND status <> '{WorkerStatus.DEAD}'
RETURNING id
""")


def register_worker(conn: Connection, *, worker_id: str, slot: str, host: str, pid: int,
                    model: str, gpu_ids: str, kind: SlotKind = SlotKind.WORKER) -> None:
    # Registered from inside its SLURM job (a worker, or the watchdog for a server): its job and node.
    job = this_job()
    conn.execute(_REGISTER, {"id": worker_id, "slot": slot, "host": host, "pid": pid,
                             "model": model, "gpu_ids": gpu_ids, "kind": kind,
                             "scheduler_job": job.job_id, "scheduler_node": job.node})


def heartbeat(conn: Connection, *, worker_id: str, status: WorkerStatus, in_flight: int,
              requests_done: int, tokens_done: int, progressed: bool) -> bool:
    """Record liveness; False means this worker was declared dead and must stop (fencing)."""
    row = conn.execute(_HEARTBEAT, {"id": worker_id, "status": status, "in_flight": in_flight,
                                    "requests_done": requests_done, "tokens_done": tokens_done,
                                    "progressed": progressed})
    return row.first() is not None


# A pool worker's backends, upserted with each heartbeat.
_REPORT_BACKENDS = text("""
INSERT INTO backends AS b (worker_id, url, model, state, in_flight, completed, errors, last_error, checked_at,
                           allowance, allowance_reason)
SELECT :worker_id, r.url, :model, r.state, r.in_flight, r.completed, r.errors, r.last_error, to_timestamp(r.checked_at),
       r.allowance, r.allowance_reason
FROM json_to_recordset(CAST(:backends AS json))
     AS r(url text, state text, in_flight int, completed bigint, errors jsonb, last_error text, checked_at float8,
          allowance int, allowance_reason text)
ORDER BY r.url
ON CONFLICT (worker_id, url) DO UPDATE
SET state = excluded.state, in_flight = excluded.in_flight, completed = excluded.completed,
    errors = excluded.errors, last_error = excluded.last_error, checked_at = excluded.checked_at,
    allowance = excluded.allowance, allowance_reason = excluded.allowance_reason
""")


def report_backends(conn: Connection, worker_id: str, model: str, states: list) -> None:
    """Record a pool's backends (engines.openai_http.BackendState) for batchctl, the status page
    and /metrics."""
    conn.execute(_REPORT_BACKENDS, {"worker_id": worker_id, "model": model, "backends": json.dumps([
        {"url": s.url, "state": s.state, "in_flight": s.in_flight, "completed": s.completed,
         "errors": dict(s.errors), "last_error": s.last_error, "checked_at": s.checked_at,
         "allowance": s.allowance, "allowance_reason": s.allowance_reason} for s in states])})


# --- A server's beat, written by the watchdog's probe of it. ---

# What the live pool workers hold on a server and have had answered by it (their heartbeats report it).
_SERVER_LOAD = text(f"""
SELECT coalesce(sum(b.in_flight), 0) AS in_flight, coalesce(sum(b.completed), 0) AS completed
FROM backends b JOIN workers w ON w.id = b.worker_id
WHERE b.url = :url AND w.status NOT IN ({_ENDED})
""")

_RECORD_PROBE = text("UPDATE workers SET probe = :probe WHERE id = :id")


def server_load(conn: Connection, url: str) -> tuple[int, int]:
    """(requests the pool workers hold on the server at `url`, requests it answered them)."""
    row = conn.execute(_SERVER_LOAD, {"url": url}).one()
    return int(row.in_flight), int(row.completed)


def record_probe(conn: Connection, worker_id: str, probe: str) -> None:
    conn.execute(_RECORD_PROBE, {"id": worker_id, "probe": probe})


# --- Operators' commands to a host's watchdog. ---

_REQUEST_COMMAND = text("INSERT INTO slot_commands (host, slot, command) VALUES (:host, :slot, :command)")

_TAKE_COMMANDS = text("""
UPDATE slot_commands SET taken_at = now()
WHERE host = :host AND slot = ANY(:slots) AND taken_at IS NULL
RETURNING slot, command
""")


def request_command(conn: Connection, host: str, slot: str, command: SlotCommand) -> None:
    conn.execute(_REQUEST_COMMAND, {"host": host, "slot": slot, "command": command})


def take_commands(conn: Connection, host: str, slots: list[str]) -> list:
    """The commands waiting for these slots of this host, each taken once (by the watchdog that
    runs the slot: another on the same host leaves them)."""
    return conn.execute(_TAKE_COMMANDS, {"host": host, "slots": slots}).all()


# --- Death: declared by the watchdog that saw it, or by anyone once a heartbeat is too old; each
# with its cause (`worker_deaths`), which decides whether the requests it held are charged a crash.

# A worker silent for the timeout is declared dead by whoever notices, but it is its own host's
# watchdog that tells a hung worker (charged) while that host beats: anyone else takes it only
# when its host is silent too (lost with it: power, a cut link), or, should its watchdog not judge
# it, once it has been silent for UNWATCHED_SILENCES timeouts (nobody saw it fail: uncharged).
UNWATCHED_SILENCES = 3

_MARK_SILENT_DEAD = text(f"""
WITH silent AS (
    SELECT w.id, h.last_seen IS NULL OR h.last_seen < now() - make_interval(secs => :timeout) AS host_silent,
           format('no heartbeat for %s s; its host''s watchdog %s', round(extract(epoch FROM now() - w.last_seen)),
                  coalesce(format('last beat %s s ago', round(extract(epoch FROM now() - h.last_seen))),
                           'never beat')) AS detail
    FROM workers w LEFT JOIN hosts h ON h.host = w.host
    WHERE w.status NOT IN ({_ENDED}) AND w.last_seen < now() - make_interval(secs => :timeout)
      AND (h.last_seen IS NULL OR h.last_seen < now() - make_interval(secs => :timeout)
           OR w.last_seen < now() - make_interval(secs => :timeout * {UNWATCHED_SILENCES}))
    ORDER BY w.id FOR UPDATE OF w SKIP LOCKED),  -- one beating now, or declared by another now, is skipped
dead AS (
    UPDATE workers w SET status = '{WorkerStatus.DEAD}', stopped_at = now()
    FROM silent s WHERE w.id = s.id
    RETURNING w.id, s.host_silent, s.detail)
INSERT INTO worker_deaths (worker_id, cause, detail, declared_by)
SELECT id, CASE WHEN host_silent THEN '{DeathCause.HOST_SILENT}' ELSE '{DeathCause.UNWATCHED}' END, detail, :declared_by
FROM dead
ON CONFLICT (worker_id) DO NOTHING
""")

# A worker that stopped cleanly keeps its `stopped`: it handed everything back itself. The first
# cause recorded stands (a fenced worker's exit comes after its death was declared elsewhere).
_MARK_DEAD = text(f"""
WITH dead AS (
    UPDATE workers SET status = '{WorkerStatus.DEAD}', stopped_at = coalesce(stopped_at, now())
    WHERE id = :worker_id AND status NOT IN ({_ENDED})
    RETURNING id)
INSERT INTO worker_deaths (worker_id, cause, detail, declared_by)
SELECT id, :cause, :detail, :declared_by FROM dead
ON CONFLICT (worker_id) DO NOTHING
""")


_MARK_STOPPED = text(f"""
UPDATE workers SET status = '{WorkerStatus.STOPPED}', stopped_at = now(), in_flight = 0
WHERE id = :worker_id AND status NOT IN ({_ENDED})
""")

_BEAT_HOST = text("""
INSERT INTO hosts (host) VALUES (:host)
ON CONFLICT (host) DO UPDATE SET last_seen = now()
""")


def mark_stopped(conn: Connection, worker_id: str) -> None:
    """A server the watchdog stopped on purpose (a worker records its own stop with its last beat)."""
    conn.execute(_MARK_STOPPED, {"worker_id": worker_id})


def beat_host(conn: Connection, host: str) -> None:
    """The host's watchdog lives and reaches the database."""
    conn.execute(_BEAT_HOST, {"host": host})


def mark_silent_workers_dead(conn: Connection, heartbeat_timeout: float, declared_by: str) -> None:
    conn.execute(_MARK_SILENT_DEAD, {"timeout": heartbeat_timeout, "declared_by": declared_by})


def mark_worker_dead(conn: Connection, worker_id: str, cause: DeathCause, detail: str = "",
                     declared_by: str = "") -> None:
    conn.execute(_MARK_DEAD, {"worker_id": worker_id, "cause": cause, "detail": detail, "declared_by": declared_by})


# --- What the API asks: which models are served, and is anyone alive for them. ---

_LIVENESS = text(f"""
SELECT model,
       bool_or(status IN ({sql_list(SERVING_WORKER_STATUSES)})
               AND last_seen > now() - make_interval(secs => :timeout)) AS live,
       bool_or(status = '{WorkerStatus.NO_BACKEND}'
               AND last_seen > now() - make_interval(secs => :timeout)) AS no_backend,
       extract(epoch FROM now() - max(last_seen)) AS age,
       min(started_at) AS first_seen
FROM workers WHERE kind = '{SlotKind.WORKER}' GROUP BY model
""")


def model_liveness(conn: Connection, heartbeat_timeout: float) -> dict[str, tuple[bool, bool, float]]:
    """{model: (a live worker serves it, a live pool worker waits for a healthy backend, seconds
    since any of its workers was last seen)}."""
    rows = conn.execute(_LIVENESS, {"timeout": heartbeat_timeout}).all()
    return {row.model: (row.live, row.no_backend, float(row.age)) for row in rows}


def served_models(conn: Connection, heartbeat_timeout: float) -> list[dict]:
    """OpenAI Model objects for every model with a live worker."""
    rows = conn.execute(_LIVENESS, {"timeout": heartbeat_timeout}).all()
    return [{"id": row.model, "object": "model", "created": int(row.first_seen.timestamp()),
             "owned_by": "vllm-batch-server"} for row in rows if row.live]


# --- What the watchdog reads and records. ---

_STATES = text("""
SELECT id, pid, slot, status, in_flight,
       extract(epoch FROM now() - last_seen) AS heartbeat_age,
       extract(epoch FROM now() - last_progress_at) AS progress_age
FROM workers WHERE id = ANY(CAST(:ids AS uuid[]))
""")


def worker_states(conn: Connection, worker_ids: list[str]) -> dict[str, object]:
    """The rows of the given workers (those that registered), keyed by worker id."""
    if not worker_ids:
        return {}
    return {str(row.id): row for row in conn.execute(_STATES, {"ids": worker_ids})}


_LEFTOVERS = text(f"""
SELECT id, pid, slot FROM workers
WHERE host = :host AND slot = ANY(:slots) AND status NOT IN ({_ENDED})
""")


def leftover_workers(conn: Connection, host: str, slots: list[str]) -> list:
    """Workers of these slots that a previous watchdog left running (or that died without a word)."""
    return conn.execute(_LEFTOVERS, {"host": host, "slots": slots}).all()


# The restarts that count against a slot's hourly cap; a `reset` row marks where an operator
# cleared the count and is not a restart itself. `host` and `slot` are SQL expressions, so the
# same count serves one slot (bound parameters) and every slot of a listing (its columns).
RESET_REASON = "reset"


def restarts_in_last_hour_sql(host: str, slot: str) -> str:
    return f"""(SELECT count(*) FROM worker_restarts counted
    WHERE counted.host = {host} AND counted.slot = {slot} AND counted.reason <> '{RESET_REASON}'
      AND counted.restarted_at > greatest(now() - interval '1 hour',
          coalesce((SELECT max(cleared.restarted_at) FROM worker_restarts cleared
                    WHERE cleared.host = {host} AND cleared.slot = {slot}
                      AND cleared.reason = '{RESET_REASON}'), '-infinity')))"""


_RESTARTS_IN_LAST_HOUR = text(f"SELECT {restarts_in_last_hour_sql(':host', ':slot')}")

_RECORD_RESTART = text("""
INSERT INTO worker_restarts (slot, host, worker_id, reason, exit_code)
VALUES (:slot, :host, :worker_id, :reason, :exit_code)
""")


def restarts_in_last_hour(conn: Connection, host: str, slot: str) -> int:
    return conn.execute(_RESTARTS_IN_LAST_HOUR, {"host": host, "slot": slot}).scalar_one()


def record_restart(conn: Connection, *, host: str, slot: str, worker_id: str | None, reason: str,
                   exit_code: int | None) -> None:
    conn.execute(_RECORD_RESTART, {"host": host, "slot": slot, "worker_id": worker_id, "reason": reason,
                                   "exit_code": exit_code})


_SLOT_HAS_RUN = text("""
SELECT EXISTS (SELECT 1 FROM workers WHERE slot = :slot AND host = :host)
    OR EXISTS (SELECT 1 FROM worker_restarts WHERE slot = :slot AND host = :host)
""")


_IS_SERVER_SLOT = text(f"""
SELECT EXISTS (SELECT 1 FROM workers WHERE slot = :slot AND host = :host AND kind = '{SlotKind.SERVER}')
""")


def is_server_slot(conn: Connection, host: str, slot: str) -> bool:
    return conn.execute(_IS_SERVER_SLOT, {"host": host, "slot": slot}).scalar_one()


def slot_has_run(conn: Connection, host: str, slot: str) -> bool:
    return conn.execute(_SLOT_HAS_RUN, {"host": host, "slot": slot}).scalar_one()


def reset_restarts(conn: Connection, host: str, slot: str) -> None:
    """Clear a slot stopped at the restart cap: its count starts again from zero."""
    record_restart(conn, host=host, slot=slot, worker_id=None, reason=RESET_REASON, exit_code=None)
