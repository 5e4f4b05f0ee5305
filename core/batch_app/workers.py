"""What the API knows of workers: which models are served and whether anyone is alive."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection

_LIVENESS = text("""
SELECT model,
       bool_or(status NOT IN ('dead', 'stopped', 'failed')
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
