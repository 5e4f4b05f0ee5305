"""Periodic repairs any process may run, safe to run concurrently from many hosts: rescue
requests of dead workers, expire batches past their window, finish batches whose finisher died.

Every watchdog and every worker runs them on a `Housekeeper` thread of its own, so a long file
build (an expired batch of embeddings can be gigabytes) never holds up an engine or the
watchdog's checks.
"""

from __future__ import annotations

import logging
import threading

from ..config import Settings
from ..database import Database
from ..outage import describe, is_unreachable, outage
from . import finalize, queue

log = logging.getLogger(__name__)


def rescue(db: Database, settings: Settings) -> list[str]:
    """Hand requests of dead workers back to the queue; returns the batches a poison failure may
    have completed (housekeeping finalizes those, off any caller's thread of supervision).

    Workers silent for HEARTBEAT_TIMEOUT count as dead, unless this process itself could not
    reach the database during that time: then nobody could have written a heartbeat.
    """
    silence = settings.heartbeat_timeout if outage.quiet_for(settings.heartbeat_timeout) else None
    with db.begin() as conn:
        requeued, poisoned_batches = queue.rescue(conn, silence, settings.max_attempts)
    if requeued or poisoned_batches:
        log.warning("rescued %d requests of dead workers; poison requests failed in %s",
                    requeued, ", ".join(poisoned_batches) or "no batch")
    return poisoned_batches


def run_once(db: Database, settings: Settings) -> None:
    finalize.finalize_ready(db, rescue(db, settings))
    for batch_id in finalize.expire_due(db):
        log.warning("batch %s expired: its completion window ended", batch_id)
    with db.connect() as conn:
        done = queue.done_but_in_progress(conn)
    for batch_id in finalize.finalize_ready(db, done):
        log.warning("batch %s had nothing left to run but was never finalized; finalized it", batch_id)
    finalize.finish_stranded(db)


class Housekeeper(threading.Thread):
    """Runs `run_once` every HOUSEKEEPING_INTERVAL; a failed round is logged and retried next time."""

    def __init__(self, db: Database, settings: Settings):
        super().__init__(name="housekeeping", daemon=True)
        self.db = db
        self.settings = settings
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.settings.housekeeping_interval):
            try:
                run_once(self.db, self.settings)
                outage.reached()
            except Exception as exc:  # the next round tries again; nothing here may end the process
                if is_unreachable(exc):
                    outage.failed(exc, "housekeeping")
                else:
                    log.error("housekeeping failed: %s", describe(exc), exc_info=exc)

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)  # a round under way (a long file build) is rolled back if the process ends
