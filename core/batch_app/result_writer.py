"""Writes finished requests to the database in small grouped transactions, off the engine thread.

Grouping (up to `max_group` results or `max_delay` seconds) keeps the database from becoming the
bottleneck at thousands of results a second; the engine thread never waits on a write.
"""

from __future__ import annotations

import logging
import queue as stdlib_queue
import threading
import time

from sqlalchemy.engine import Engine

from . import finalize, queue
from .queue import Completion

log = logging.getLogger(__name__)


class ResultWriter(threading.Thread):
    def __init__(self, engine: Engine, worker_id: str, max_group: int = 512, max_delay: float = 0.05):
        super().__init__(name="result-writer", daemon=True)
        self.db = engine
        self.worker_id = worker_id
        self.max_group = max_group
        self.max_delay = max_delay
        self._pending: stdlib_queue.Queue[Completion | None] = stdlib_queue.Queue()
        self.refused = 0

    def put(self, completion: Completion) -> None:
        self._pending.put(completion)

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
            while item is not None:
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
            for _ in range(len(group) + closing):
                self._pending.task_done()

    def _write(self, group: list[Completion]) -> None:
        while True:
            try:
                with self.db.begin() as conn:
                    accepted = queue.complete(conn, self.worker_id, group)
                break
            except Exception as exc:  # keep the results and retry: losing them would cost a rerun
                log.error("writing %d results failed, retrying: %s: %s", len(group), type(exc).__name__, exc)
                time.sleep(1.0)
        if len(accepted) < len(group):
            self.refused += len(group) - len(accepted)
            log.warning("%d results refused: those requests are no longer this worker's",
                        len(group) - len(accepted))
        for batch_id in finalize.finalize_ready(self.db, sorted(set(accepted.values()))):
            log.info("batch %s finalized", batch_id)
