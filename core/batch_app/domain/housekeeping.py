"""Periodic repairs any process may run, safe to run concurrently from many hosts: rescue
requests of dead workers, expire batches past their window, finish batches whose finisher died,
delete expired files.

Every watchdog and every worker runs them on a `Housekeeper` thread of its own, so a long file
build (an expired batch of embeddings can be gigabytes) never holds up an engine or the
watchdog's checks.
"""

from __future__ import annotations

import logging

from ..config import Settings
from ..database import Database
from ..outage import outage
from ..periodic import Periodic
from . import finalize, queue, storage

log = logging.getLogger(__name__)


def rescue(db: Database, settings: Settings) -> list[str]:
    """Hand requests of dead workers back to the queue; returns the batches a poison failure may
    have completed (housekeeping finalizes those, off any caller's thread of supervision).

    Workers silent for HEARTBEAT_TIMEOUT count as dead, unless this process itself could not
    reach the database during that time: then nobody could have written a heartbeat.
    """
    silence = settings.heartbeat_timeout if outage.quiet_for(settings.heartbeat_timeout) else None
    with db.begin() as conn:
        rescued = queue.rescue(conn, silence, settings.max_attempts, settings.host_name)
    if rescued.requeued or rescued.poisoned_batches:
        log.warning("rescued %d requests of dead workers; poison requests failed in %s",
                    rescued.requeued, ", ".join(rescued.poisoned_batches) or "no batch")
    for row in rescued.lost_with_hosts:
        if row.host_losses >= settings.warn_after_host_losses:
            log.warning("request %d (custom_id %s of batch %s) was in flight at %d host losses in a row; it is "
                        "not failed for that, but it may be what brings its hosts down", row.id, row.custom_id,
                        row.batch_id, row.host_losses)
    return rescued.poisoned_batches


def run_once(db: Database, settings: Settings) -> None:
    finalize.finalize_ready(db, rescue(db, settings))
    for batch_id in finalize.expire_due(db):
        log.warning("batch %s expired: its completion window ended", batch_id)
    with db.connect() as conn:
        done = queue.done_but_in_progress(conn)
    for batch_id in finalize.finalize_ready(db, done):
        log.warning("batch %s had nothing left to run but was never finalized; finalized it", batch_id)
    finalize.finish_stranded(db)
    with db.begin() as conn:
        if expired := storage.delete_expired(conn):
            log.info("deleted %d expired files: %s", len(expired), ", ".join(expired[:20]))


class Housekeeper(Periodic):
    """Runs `run_once` every HOUSEKEEPING_INTERVAL. A round under way when its process ends (a
    long file build) is rolled back."""

    def __init__(self, db: Database, settings: Settings):
        super().__init__("housekeeping", settings.housekeeping_interval, "housekeeping")
        self.db, self.settings = db, settings

    def run_round(self) -> None:
        run_once(self.db, self.settings)
