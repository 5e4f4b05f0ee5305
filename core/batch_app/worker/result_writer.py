"""Writes finished requests to the database in small grouped transactions, off the engine thread.

Grouping (up to `max_group` results or `max_delay` seconds) keeps the database from becoming the
bottleneck at thousands of results a second; the engine thread never waits on a write.

Nothing ends this thread: while the database is unreachable it keeps every result in memory
and retries (the worker stops claiming once `backlog` is large); a result that cannot be stored
is stored as an error line instead; a failure to finalize a batch is logged with its type and
message and retried, then left to housekeeping. Should the thread
stop all the same, the worker loop sees it (`is_alive`) and exits, to be restarted.
"""

from __future__ import annotations

import dataclasses
import logging
import queue as stdlib_queue
import threading
import time

from ..database import Database
from ..domain import finalize, queue
from ..domain.queue import Completion
from ..outage import describe, is_unreachable, outage

log = logging.getLogger(__name__)


# Handed in to end the group being gathered and write it without waiting out max_delay.
_WRITE_NOW = object()
# Seconds between retries of finalizing after a failure that is not an outage (a bug, a full
# disk), and how many tries before it is left to housekeeping.
_FAILURE_RETRY = 5.0
_FINALIZE_TRIES = 3


class ResultWriter(threading.Thread):
    def __init__(self, db: Database, worker_id: str, max_group: int = 512, max_delay: float = 1.0,
                 max_response_bytes: int = queue.MAX_RESPONSE_BYTES):
        super().__init__(name="result-writer", daemon=True)
        self.db = db
        self.worker_id = worker_id
        self.max_response_bytes = max_response_bytes
        self.max_group = max_group
        self.max_delay = max_delay
        self._pending: stdlib_queue.Queue[Completion | object | None] = stdlib_queue.Queue()
        self._unstored: set[int] = set()  # ids of results handed in and not yet stored
        self._lock = threading.Lock()

    def put(self, completion: Completion) -> None:
        with self._lock:
            self._unstored.add(completion.id)
        self._pending.put(completion)

    @property
    def backlog(self) -> int:
        """Results handed in and not yet stored."""
        return len(self._unstored)

    def unstored_ids(self) -> set[int]:
        with self._lock:
            return set(self._unstored)

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
        with self._lock:
            self._unstored.difference_update(completion.id for completion in group)
        if len(accepted) < len(group):
            log.warning("%d results refused: those requests are no longer this worker's",
                        len(group) - len(accepted))
        self._finalize(sorted(set(accepted.values())))

    def _store(self, group: list[Completion], last_resort: bool = False) -> dict[int, str]:
        """Store a group; retry while the database is unreachable, isolate results it refuses."""
        while True:
            try:
                with self.db.begin() as conn:
                    accepted = queue.complete(conn, self.worker_id, group, self.max_response_bytes)
                outage.reached()
                return accepted
            except Exception as exc:
                if is_unreachable(exc):  # keep the results and retry
                    time.sleep(outage.failed(exc, f"storing {len(group)} results"))
                    continue
                # Refused, or failing before it reached the database (a result that does not
                # serialize): the same every time, so the culprit is found and stored as an error.
                if len(group) == 1:
                    if last_resort:
                        log.critical("request %d could not be stored even as an error (%s); it runs again "
                                     "once this worker is gone", group[0].id, describe(exc), exc_info=exc)
                        return {}
                    return self._store([_unstorable(group[0], exc)], last_resort=True)
                log.error("storing a group of %d results failed (%s); writing them one by one",
                          len(group), describe(exc))
                accepted: dict[int, str] = {}
                for completion in group:
                    accepted.update(self._store([completion]))
                return accepted

    def _finalize(self, batch_ids: list[str]) -> None:
        """Finalize the batches that these results finished, retrying while the database is
        unreachable and a few times on other failures; then the batch is left to housekeeping
        (which finishes a `finalizing` batch after a grace period, or finalizes one still in
        progress), so one batch never holds up this worker's other results."""
        to_finish: list[str] = []
        failures = 0
        while True:
            try:
                if batch_ids:
                    to_finish, batch_ids = finalize.start_finalizing(self.db, batch_ids), []
                while to_finish:
                    finalize.finish(self.db, to_finish[0])
                    log.info("batch %s finalized", to_finish.pop(0))
                outage.reached()
                return
            except Exception as exc:
                if is_unreachable(exc):
                    time.sleep(outage.failed(exc, "finalizing batches"))
                    continue
                failures += 1
                left = ", ".join(batch_ids or to_finish)
                if failures >= _FINALIZE_TRIES:
                    log.error("finalizing batches %s failed %d times (%s); housekeeping will finish them",
                              left, failures, describe(exc), exc_info=exc)
                    return
                log.error("finalizing batches %s failed, retrying in %.0f s: %s", left, _FAILURE_RETRY,
                          describe(exc), exc_info=exc)
                time.sleep(_FAILURE_RETRY)


def _unstorable(completion: Completion, exc: Exception) -> Completion:
    """The request ends as an error line rather than blocking the worker or vanishing."""
    message = f"The result could not be stored: {describe(exc)}"
    log.error("request %d: %s", completion.id, message)
    return dataclasses.replace(completion, status_code=500, response={"error": {
        "message": message, "type": "server_error", "param": None, "code": "result_not_stored"}})
