"""Periodic repairs any process may run, safe to run concurrently from many hosts:
rescue requests of dead workers, expire batches past their window, finish stranded batches."""

from __future__ import annotations

import logging

from sqlalchemy.engine import Engine

from . import finalize, queue
from .config import Settings

log = logging.getLogger(__name__)


def rescue_now(engine: Engine, settings: Settings) -> None:
    """Hand requests of dead workers back to the queue; finish batches a poison failure completed."""
    with engine.begin() as conn:
        requeued, poisoned_batches = queue.rescue(conn, settings.heartbeat_timeout, settings.max_attempts)
    if requeued or poisoned_batches:
        log.warning("rescued %d requests of dead workers; poison requests failed in %s",
                    requeued, ", ".join(poisoned_batches) or "no batch")
    finalize.finalize_ready(engine, poisoned_batches)


def run_once(engine: Engine, settings: Settings) -> None:
    rescue_now(engine, settings)
    for batch_id in finalize.expire_due(engine):
        log.warning("batch %s expired: its completion window ended", batch_id)
    finalize.finish_stranded(engine)
