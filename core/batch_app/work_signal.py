"""Wakes an idle worker as soon as requests are queued, instead of it polling the queue.

A database connection of its own LISTENs on queue.WORK_CHANNEL. Notifications only shorten the
wait: the worker still claims on a timer, so a lost one (or a pooler that drops LISTEN) costs at
most one poll interval, never a request.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.engine import Engine

from .queue import WORK_CHANNEL

log = logging.getLogger(__name__)


# Seconds between attempts to listen again after the database was unreachable.
_RETRY_INTERVAL = 5.0


class WorkSignal:
    def __init__(self, db: Engine):
        self.db = db
        self._pooled = None  # the pool's wrapper, invalidated on close so no one reuses a listener
        self._retry_at = 0.0

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` seconds for a wake-up; True if one came."""
        started = time.monotonic()
        if self._notified(timeout):
            return True
        time.sleep(max(0.0, timeout - (time.monotonic() - started)))  # when not listening
        return False

    def pending(self) -> bool:
        """Whether a wake-up has arrived, without waiting."""
        return self._notified(0)

    def _notified(self, timeout: float) -> bool:
        connection = self._listening()
        if connection is None:
            return False
        try:
            return any(True for _ in connection.notifies(timeout=timeout, stop_after=1))
        except Exception as exc:  # the database went away: the timer claims until it is back
            log.warning("lost the wake-up connection (%s: %s); polling until it is back", type(exc).__name__, exc)
            self.close()
            return False

    def _listening(self):
        if self._pooled is None and time.monotonic() >= self._retry_at:
            try:
                pooled = self.db.raw_connection()
                pooled.rollback()
                pooled.driver_connection.autocommit = True
                pooled.driver_connection.execute(f"LISTEN {WORK_CHANNEL}")
                self._pooled = pooled
            except Exception as exc:
                log.warning("cannot listen for wake-ups (%s: %s); polling instead", type(exc).__name__, exc)
                self._retry_at = time.monotonic() + _RETRY_INTERVAL
        return None if self._pooled is None else self._pooled.driver_connection

    def close(self) -> None:
        if self._pooled is not None:
            pooled, self._pooled = self._pooled, None
            self._retry_at = time.monotonic() + _RETRY_INTERVAL
            pooled.invalidate()
