"""Retention: a thread of every watchdog that deletes finished history (domain/retention.py says
what), one watchdog at a time.

Every RETENTION_INTERVAL it deletes RETENTION_BATCH_ROWS rows a transaction, each transaction
taking the retention lock first (another watchdog holding it means that one is at work), until a
statement deletes fewer rows than that, with a short pause between transactions so autovacuum and
the claims keep their share of the database.
"""

from __future__ import annotations

import logging
import random

from ..config import Settings
from ..database import Database
from ..domain import retention
from ..periodic import Periodic

log = logging.getLogger(__name__)

PAUSE = 0.01  # seconds between two delete transactions (jittered)


class Retention(Periodic):
    def __init__(self, db: Database, settings: Settings):
        super().__init__("retention", settings.retention_interval, "deleting finished history")
        self.db, self.settings = db, settings

    def run_round(self) -> dict[str, int]:
        """One round; returns how many rows of each kind it deleted."""
        deleted = {"finished requests": self._prune_finished_requests()}
        for rule in retention.HISTORY:
            deleted[rule.name] = self._repeat(lambda conn, rule=rule: retention.delete_history(
                conn, rule, getattr(self.settings, rule.keep_setting), self.settings.retention_batch_rows))
        if any(deleted.values()):
            log.info("retention deleted %s", ", ".join(f"{n} {name}" for name, n in deleted.items() if n))
        return deleted

    def _prune_finished_requests(self) -> int:
        total = 0
        while not self.stopped:
            with self.db.begin() as conn:
                if not retention.locked(conn):
                    return total
                batch_id = retention.next_finished_batch(conn, self.settings.finished_requests_retention)
            if batch_id is None:
                return total
            total += self._repeat(lambda conn: retention.delete_finished_requests(
                conn, batch_id, self.settings.retention_batch_rows))
        return total

    def _repeat(self, delete) -> int:
        """Run `delete` in transactions of its own until one deletes less than a full batch."""
        total = 0
        while not self.stopped:
            with self.db.begin() as conn:
                if not retention.locked(conn):
                    return total
                deleted = delete(conn)
            total += deleted
            if deleted < self.settings.retention_batch_rows:
                return total
            self._stopped.wait(PAUSE * random.uniform(0.5, 1.5))
        return total
