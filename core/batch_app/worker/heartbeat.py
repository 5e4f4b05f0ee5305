"""The worker's heartbeat: a thread of its own, so a busy or hung engine never silences it.

Every interval it writes `last_seen`, the worker status and the engine's progress counters; the
watchdog tells a hung engine (counters frozen while requests are held) from a busy one. While
the database is unreachable it keeps trying every interval; nobody judges that silence (see
outage.Outage.quiet_for).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from ..database import Database
from ..domain import registry
from ..domain.statuses import WorkerStatus
from ..engines.base import EngineProgress
from ..outage import describe, is_unreachable, outage
from ..shutdown import FENCED_EXIT_CODE

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(self, db: Database, worker_id: str, interval: float,
                 sample: Callable[[], tuple[WorkerStatus, int, EngineProgress, list]], model: str):
        super().__init__(name="heartbeat", daemon=True)
        self.db = db
        self.worker_id = worker_id
        self.interval = interval
        self.sample = sample  # -> (status, requests in flight, progress counters, a pool's backends)
        self.model = model
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._steps_reported = 0

    def run(self) -> None:
        while not self._stopped.is_set():
            self.beat()
            self._wake.wait(self.interval)
            self._wake.clear()

    def beat(self) -> None:
        status, in_flight, progress, backends = self.sample()
        steps = progress.steps  # once: a pool's own thread advances it meanwhile
        try:
            with self.db.begin() as conn:
                alive = registry.heartbeat(conn, worker_id=self.worker_id, status=status, in_flight=in_flight,
                                        requests_done=progress.requests_finished,
                                        tokens_done=progress.tokens_generated,
                                        progressed=steps != self._steps_reported)
                if alive and backends:
                    self._report(conn, backends)
        except Exception as exc:  # nothing may end this thread; the next beat retries
            if is_unreachable(exc):
                outage.failed(exc, "writing the heartbeat")
            else:
                log.error("heartbeat failed: %s", describe(exc))
            return
        outage.reached()
        self._steps_reported = steps
        if not alive:
            log.critical("this worker was declared dead and its requests were handed back; exiting")
            os._exit(FENCED_EXIT_CODE)

    def _report(self, conn, backends: list) -> None:
        """A pool's backends, in a savepoint: a report that fails must not cost the heartbeat."""
        try:
            with conn.begin_nested():
                registry.report_backends(conn, self.worker_id, self.model, backends)
        except Exception as exc:
            if is_unreachable(exc):
                raise
            log.error("could not record the backends: %s", describe(exc))

    def beat_now(self) -> None:
        """Write a beat at once (status changes such as loading -> idle)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        self.join(timeout=self.interval + 5)
