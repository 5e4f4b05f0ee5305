"""Writes finished requests to the database in small grouped transactions, off the engine thread.

Grouping (up to `max_group` results or `max_delay` seconds) keeps the database from becoming the
bottleneck at thousands of results a second; the engine thread never waits on a write.
"""

from __future__ import annotations

import dataclasses
import logging
import queue as stdlib_queue
import threading
import time

from sqlalchemy.exc import DBAPIError, OperationalError

from ..database import Database
from ..domain import finalize, queue
from ..domain.queue import Completion

log = logging.getLogger(__name__)


# Handed in to end the group being gathered and write it without waiting out max_delay.
_WRITE_NOW = object()


class ResultWriter(threading.Thread):
    def __init__(self, db: Database, worker_id: str, max_group: int = 512, max_delay: float = 1.0):
        super().__init__(name="result-writer", daemon=True)
        self.db = db
        self.worker_id = worker_id
        self.max_group = max_group
        self.max_delay = max_delay
        self._pending: stdlib_queue.Queue[Completion | object | None] = stdlib_queue.Queue()

    def put(self, completion: Completion) -> None:
        self._pending.put(completion)

    def write_now(self) -> None:
        """Write what was handed in so far without waiting for more (the engine has run dry)."""
        self._pending.put(_WRITE_NOW)

    def flush(self) -> None:
        """Block until everything handed in so far is written."""
        self._pending.join()

    def close(self) -> None:
        """Write everything handed in so far, then stop."""
        self._pending.put(None)
        self.join()

    def run(self) -> None:
        closing = False
        while not closing:
            group: list[Completion] = []
            item = self._pending.get()
            deadline = time.monotonic() + self.max_delay
            while isinstance(item, Completion):
                group.append(item)
                if len(group) >= self.max_group:
                    break
                try:
                    item = self._pending.get(timeout=max(0.0, deadline - time.monotonic()))
                except stdlib_queue.Empty:
                    break
            closing = item is None
            if group:
                self._write(group)
            for _ in range(len(group) + (closing or item is _WRITE_NOW)):
                self._pending.task_done()

    def _write(self, group: list[Completion]) -> None:
        accepted = self._store(group)
        if len(accepted) < len(group):
            log.warning("%d results refused: those requests are no longer this worker's",
                        len(group) - len(accepted))
        for batch_id in finalize.finalize_ready(self.db, sorted(set(accepted.values()))):
            log.info("batch %s finalized", batch_id)

    def _store(self, group: list[Completion]) -> dict[int, str]:
        """Store a group; retry while the database is unreachable, isolate results it refuses."""
        while True:
            try:
                with self.db.begin() as conn:
                    return queue.complete(conn, self.worker_id, group)
            except OperationalError as exc:  # connection trouble: keep the results and retry
                log.error("writing %d results failed, retrying: %s: %s", len(group), type(exc.orig or exc).__name__,
                          exc.orig or exc)
                time.sleep(1.0)
            except DBAPIError as exc:
                if len(group) == 1:
                    return self._store([_unstorable(group[0], exc)])
                log.error("the database refused a group of %d results (%s: %s); writing them one by one",
                          len(group), type(exc.orig or exc).__name__, exc.orig or exc)
                accepted: dict[int, str] = {}
                for completion in group:
                    accepted.update(self._store([completion]))
                return accepted


def _unstorable(completion: Completion, exc: DBAPIError) -> Completion:
    """The request ends as an error line rather than blocking the worker or vanishing."""
    message = f"The result could not be stored: {type(exc.orig or exc).__name__}: {exc.orig or exc}"
    log.error("request %d: %s", completion.id, message)
    return dataclasses.replace(completion, status_code=500, response={"error": {
        "message": message, "type": "server_error", "param": None, "code": "result_not_stored"}})
