"""Tells a worker, without polling the database, when work was queued or taken away.

A database connection of its own LISTENs on queue.WORK_CHANNEL (requests were queued: an idle
worker claims at once), and on queue.WORK_TAKEN_CHANNEL and queue.BATCH_ENDED_CHANNEL (a batch
was cancelled or ended: a busy worker checks which of its requests it still owns). Notifications only make the worker prompt:
it still claims on a timer, and it checks ownership on every look while not listening and once
after listening starts, so a lost notification costs time, never a request. Behind a pooler in
transaction mode (where a LISTEN is lost with its server connection) it never listens: timers only.
"""

from __future__ import annotations

import logging
import time

from ..database import Database
from ..domain.queue import BATCH_ENDED_CHANNEL, WORK_CHANNEL, WORK_TAKEN_CHANNEL
from ..outage import describe, is_unreachable, outage

log = logging.getLogger(__name__)


# Seconds between attempts to listen again after the database was unreachable.
_RETRY_INTERVAL = 5.0


class WorkSignal:
    def __init__(self, db: Database, listen: bool = True):
        self.db, self.listen = db, listen
        self._pooled = None  # the pool's wrapper, invalidated on close so no one reuses a listener
        self._retry_at = 0.0
        self._work_queued = False
        self._work_taken = False  # set on listening, and read as True while not listening

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` seconds for requests to be queued; True if they were."""
        started = time.monotonic()
        self._receive(timeout)
        if self._pooled is None:
            time.sleep(max(0.0, timeout - (time.monotonic() - started)))
        return self._take_work_queued()

    def pending(self) -> bool:
        """Whether requests were queued since last asked, without waiting."""
        self._receive(0)
        return self._take_work_queued()

    def work_taken(self) -> bool:
        """Whether requests may have been taken from workers (a batch cancelled or ended) since
        last asked. Always True while not listening, since nothing can be known then."""
        self._receive(0)
        taken = self._work_taken or self._pooled is None
        self._work_taken = False
        return taken

    def _take_work_queued(self) -> bool:
        queued, self._work_queued = self._work_queued, False
        return queued

    def _receive(self, timeout: float) -> None:
        """Take notifications for up to `timeout` seconds, or only those already here once work is queued."""
        connection = self._listening()
        if connection is None:
            return
        deadline = time.monotonic() + timeout
        try:
            while True:
                received = False
                left = 0.0 if self._work_queued else max(0.0, deadline - time.monotonic())
                for notify in connection.notifies(timeout=left, stop_after=1):
                    received = True
                    if notify.channel == WORK_CHANNEL:
                        self._work_queued = True
                    else:
                        self._work_taken = True
                if not received:
                    return
        except Exception as exc:  # the database went away: timers take over until it is back
            log.warning("lost the wake-up connection (%s: %s); polling until it is back", type(exc).__name__, exc)
            self.close()

    def _listening(self):
        if self.listen and self._pooled is None and time.monotonic() >= self._retry_at:
            try:
                pooled = self.db.raw_connection()
                pooled.rollback()
                pooled.driver_connection.autocommit = True
                for channel in (WORK_CHANNEL, WORK_TAKEN_CHANNEL, BATCH_ENDED_CHANNEL):
                    pooled.driver_connection.execute(f"LISTEN {channel}")
                self._pooled = pooled
                self._work_taken = True  # whatever happened before listening went unheard
            except Exception as exc:
                if is_unreachable(exc):  # logged once for the whole outage
                    outage.failed(exc, "listening for wake-ups")
                else:
                    log.warning("cannot listen for wake-ups (%s); polling instead", describe(exc))
                self._retry_at = time.monotonic() + _RETRY_INTERVAL
        return None if self._pooled is None else self._pooled.driver_connection

    def close(self) -> None:
        if self._pooled is not None:
            pooled, self._pooled = self._pooled, None
            self._retry_at = time.monotonic() + _RETRY_INTERVAL
            pooled.invalidate()
