"""Periodic repairs any process may run, safe to run concurrently from many hosts:
rescue requests of dead workers, expire batches past their window, finish stranded batches."""

from __future__ import annotations

import logging

from ..config import Settings
from ..database import Database
from . import finalize, queue

log = logging.getLogger(__name__)


def rescue_now(db: Database, settings: Settings) -> None:
    """Hand requests of dead workers back to the queue; finish batches a poison failure completed."""
    with db.begin() as conn:
        requeued, poisoned_batches = queue.rescue(conn, settings.heartbeat_timeout, settings.max_attempts)
    if requeued or poisoned_batches:
        log.warning("rescued %d requests of dead workers; poison requests failed in %s",
                    requeued, ", ".join(poisoned_batches) or "no batch")
    finalize.finalize_ready(db, poisoned_batches)


def run_once(db: Database, settings: Settings) -> None:
    rescue_now(db, settings)
    for batch_id in finalize.expire_due(db):
        log.warning("batch %s expired: its completion window ended", batch_id)
    finalize.finish_stranded(db)
