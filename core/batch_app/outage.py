"""Riding out a database outage: every process keeps running while PostgreSQL is unreachable.

A process has one `outage` record, shared by its threads: the first failure to reach the
database logs the outage once, the first success after it logs its end and length, and each
caller waits a capped, growing delay before trying again. Only errors that mean "cannot reach
the database" count (`is_unreachable`); a statement the database refuses is a bug or bad data,
and goes where it went before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
import sqlalchemy.exc

log = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds between retries: FIRST_RETRY doubling per failure up to MAX_RETRY.
FIRST_RETRY, MAX_RETRY = 0.25, 5.0


def is_unreachable(exc: BaseException) -> bool:
    """Whether an error means the database is down, restarting or cut off (not a refused statement)."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                            sqlalchemy.exc.TimeoutError, psycopg.OperationalError, psycopg.InterfaceError))


def _connection_lost(exc: BaseException) -> bool:
    """A connection that failed or was cut (SQLSTATE classes 08 and 57P, or none: it never got an
    answer), as opposed to a statement the database could not complete this time (a deadlock, a
    timeout, a full disk), which is retried too but says nothing of whether anyone can reach it."""
    cause = getattr(exc, "orig", None) or exc
    state = getattr(cause, "sqlstate", None)
    return state is None or state.startswith(("08", "57P"))


def describe(exc: BaseException) -> str:
    """`OperationalError: connection ... failed: No such file or directory`: type and first line."""
    cause = getattr(exc, "orig", None) or exc
    message = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {message[0] if message else '(no message)'}"


class Outage:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self._failures = 0
        self.ended_at = float("-inf")  # time.monotonic() of the last outage's end

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def quiet_for(self, seconds: float) -> bool:
        """Whether this process has reached the database for the last `seconds`. Heartbeats are
        judged only then: nobody could write one during an outage, so its silence means nothing."""
        return self._since is None and time.monotonic() - self.ended_at >= seconds

    def failed(self, exc: BaseException, doing: str) -> float:
        """Record a failure to reach the database; returns how long to wait before trying again.
        A failed statement on a live connection is logged as such and starts no outage, so it
        never suspends the judging of heartbeats (`quiet_for`)."""
        if not _connection_lost(exc):
            log.warning("the database could not complete a statement while %s (%s); retrying", doing, describe(exc))
            return FIRST_RETRY
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()
                self._failures = 0
                log.error("database unreachable while %s (%s); retrying until it is back", doing, describe(exc))
            self._failures += 1
            return min(MAX_RETRY, FIRST_RETRY * 2 ** (self._failures - 1))

    def reached(self) -> None:
        """Record a success; ends the outage if there was one."""
        if self._since is None:
            return
        with self._lock:
            if self._since is not None:
                now = time.monotonic()
                log.warning("database reachable again after %.1f s", now - self._since)
                self._since, self.ended_at = None, now

    def stalled(self, seconds: float, doing: str) -> None:
        """A call that reached the database only after `seconds` (a link cut and mended while
        its packets waited): heartbeats went unwritten meanwhile, so judge them as after an outage."""
        log.warning("the database took %.1f s to answer while %s; judging heartbeats as after an outage", seconds, doing)
        with self._lock:
            self.ended_at = max(self.ended_at, time.monotonic())

    def retry(self, action: Callable[[], T], doing: str, stopping: threading.Event | None = None) -> T:
        """Run `action` until it reaches the database (other errors propagate). With `stopping`
        set meanwhile, the last error is raised instead of waiting on."""
        while True:
            try:
                result = action()
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
                delay = self.failed(exc, doing)
                if stopping is not None and stopping.wait(delay):
                    raise
                if stopping is None:
                    time.sleep(delay)
                continue
            self.reached()
            return result


# This process's outage record.
outage = Outage()
