"""What the API knows of workers: which models are served and whether anyone is alive."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection

_LIVENESS = text("""
SELECT model,
       bool_or(status NOT IN ('dead', 'stopped')
               AND last_seen > now() - make_interval(secs => :timeout)) AS live,
       extract(epoch FROM now() - max(last_seen)) AS age,
       min(started_at) AS first_seen
FROM workers GROUP BY model
""")


def model_liveness(conn: Connection, heartbeat_timeout: float) -> dict[str, tuple[bool, float]]:
    """{model: (has a live worker, seconds since any of its workers was last seen)}."""
    rows = conn.execute(_LIVENESS, {"timeout": heartbeat_timeout}).all()
    return {row.model: (row.live, float(row.age)) for row in rows}


def served_models(conn: Connection, heartbeat_timeout: float) -> list[dict]:
    """OpenAI Model objects for every model with a live worker."""
    rows = conn.execute(_LIVENESS, {"timeout": heartbeat_timeout}).all()
    return [{"id": row.model, "object": "model", "created": int(row.first_seen.timestamp()),
             "owned_by": "vllm-batch-server"} for row in rows if row.live]


# --- What the watchdog reads and records. ---

_PROCESS_STATES = text("""
SELECT DISTINCT ON (pid) id, pid, slot, status, in_flight,
       extract(epoch FROM now() - last_seen) AS heartbeat_age,
       extract(epoch FROM now() - last_progress_at) AS progress_age
FROM workers WHERE host = :host AND pid = ANY(:pids)
ORDER BY pid, started_at DESC
""")


def process_states(conn: Connection, host: str, pids: list[int]) -> dict[int, object]:
    """The newest worker row of each given process on this host, keyed by pid."""
    if not pids:
        return {}
    return {row.pid: row for row in conn.execute(_PROCESS_STATES, {"host": host, "pids": pids})}


_LEFTOVERS = text("""
SELECT id, pid, slot FROM workers
WHERE host = :host AND slot = ANY(:slots) AND status NOT IN ('dead', 'stopped')
""")


def leftover_workers(conn: Connection, host: str, slots: list[str]) -> list:
    """Workers of these slots that a previous watchdog left running (or that died without a word)."""
    return conn.execute(_LEFTOVERS, {"host": host, "slots": slots}).all()


# A `reset` row marks where an operator cleared the count; it is not a restart itself.
_RESTARTS_IN_WINDOW = text("""
SELECT count(*) FROM worker_restarts
WHERE host = :host AND slot = :slot AND reason <> 'reset'
  AND restarted_at > greatest(now() - interval '1 hour',
      coalesce((SELECT max(restarted_at) FROM worker_restarts
                WHERE host = :host AND slot = :slot AND reason = 'reset'), '-infinity'))
""")

_RECORD_RESTART = text("""
INSERT INTO worker_restarts (slot, host, worker_id, reason, exit_code)
VALUES (:slot, :host, :worker_id, :reason, :exit_code)
""")


def restarts_in_last_hour(conn: Connection, host: str, slot: str) -> int:
    return conn.execute(_RESTARTS_IN_WINDOW, {"host": host, "slot": slot}).scalar_one()


def record_restart(conn: Connection, *, host: str, slot: str, worker_id: str | None, reason: str,
                   exit_code: int | None) -> None:
    conn.execute(_RECORD_RESTART, {"host": host, "slot": slot, "worker_id": worker_id, "reason": reason,
                                   "exit_code": exit_code})


_SLOT_HAS_RUN = text("""
SELECT EXISTS (SELECT 1 FROM workers WHERE slot = :slot AND host = :host)
    OR EXISTS (SELECT 1 FROM worker_restarts WHERE slot = :slot AND host = :host)
""")


def slot_has_run(conn: Connection, host: str, slot: str) -> bool:
    return conn.execute(_SLOT_HAS_RUN, {"host": host, "slot": slot}).scalar_one()


def reset_restarts(conn: Connection, host: str, slot: str) -> None:
    """Clear a slot stopped at the restart cap: its count starts again from zero."""
    record_restart(conn, host=host, slot=slot, worker_id=None, reason="reset", exit_code=None)
