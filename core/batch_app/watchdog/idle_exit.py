"""IDLE_EXIT: a watchdog whose workers have had nothing to do for that many seconds (nothing
queued for their models, nothing in flight, none loading) stops them and exits as on SIGTERM, so
a SLURM job started because work waited gives its GPUs back once the work is done."""

from __future__ import annotations

import logging
import threading
import time

from ..config import Settings
from ..database import Database
from ..domain import demand
from ..periodic import Periodic

log = logging.getLogger(__name__)


class IdleExit(Periodic):
    def __init__(self, db: Database, settings: Settings, stopping: threading.Event):
        super().__init__("idle-exit", min(5.0, settings.idle_exit / 4), "checking whether this host has work")
        self.db, self.host, self.after, self.stopping = db, settings.host_name, settings.idle_exit, stopping
        self.idle_since: float | None = None

    def run_round(self) -> None:
        self.idle_since, idle_since = None, self.idle_since  # a round that fails counts as busy
        with self.db.connect() as conn:
            if demand.host_has_work(conn, self.host):
                return
        now = time.monotonic()
        self.idle_since = idle_since or now
        if now - self.idle_since >= self.after:
            log.info("nothing to do for %.0f s (IDLE_EXIT): stopping the workers and exiting", now - self.idle_since)
            self.stopping.set()
