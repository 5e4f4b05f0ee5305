"""What waits for workers: the models whose queued requests no live worker serves (the elastic
SLURM submitter starts jobs for them), and whether a host's workers have anything to do (a
watchdog with IDLE_EXIT exits when they have not)."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection

from .statuses import (
    ENDED_WORKER_STATUSES,
    SERVING_WORKER_STATUSES,
    RequestStatus,
    SlotKind,
    WorkerStatus,
    sql_list,
)

# A loading worker counts as serving: its model is on its way.
_WAITING_MODELS = text(f"""
SELECT m.model FROM unnest(CAST(:models AS text[])) AS m(model)
WHERE EXISTS (SELECT 1 FROM batch_requests r WHERE r.status = '{RequestStatus.QUEUED}' AND r.model = m.model)
  AND NOT EXISTS (SELECT 1 FROM workers w
                  WHERE w.model = m.model AND w.kind = '{SlotKind.WORKER}'
                    AND w.status IN ({sql_list(SERVING_WORKER_STATUSES)})
                    AND w.last_seen > now() - make_interval(secs => :timeout))
ORDER BY m.model
""")

_JOBS_WITH_WORKERS = text("SELECT DISTINCT scheduler_job FROM workers WHERE scheduler_job = ANY(:jobs)")

# Work for a host: a worker of it loading, holding requests, or with requests queued for its model.
# The queued request is looked up in the claimable index, in its order (an EXISTS would lose the
# order, and the planner would scan the table for one through all the finished history before it).
_HOST_HAS_WORK = text(f"""
SELECT EXISTS (
    SELECT 1 FROM workers w
    WHERE w.host = :host AND w.kind = '{SlotKind.WORKER}' AND w.status NOT IN ({sql_list(ENDED_WORKER_STATUSES)})
      AND (w.status IN ('{WorkerStatus.LOADING}', '{WorkerStatus.BUSY}', '{WorkerStatus.DRAINING}') OR w.in_flight > 0
           OR (SELECT r.project FROM batch_requests r WHERE r.status = '{RequestStatus.QUEUED}' AND r.model = w.model
               ORDER BY r.project LIMIT 1) IS NOT NULL))
""")


def waiting_models(conn: Connection, models: list[str], heartbeat_timeout: float) -> list[str]:
    """Those of `models` with queued requests and no live (or loading) worker."""
    return list(conn.execute(_WAITING_MODELS, {"models": models, "timeout": heartbeat_timeout}).scalars())


def jobs_with_workers(conn: Connection, job_ids: list[str]) -> set[str]:
    """Those of the scheduler's jobs in which a worker has registered."""
    return set(conn.execute(_JOBS_WITH_WORKERS, {"jobs": job_ids}).scalars()) if job_ids else set()


def host_has_work(conn: Connection, host: str) -> bool:
    return conn.execute(_HOST_HAS_WORK, {"host": host}).scalar_one()
