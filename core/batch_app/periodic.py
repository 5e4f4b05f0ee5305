"""A daemon thread that runs one round of work every so many seconds, for as long as its process
lives: a failed round is logged with the error's type and message (an unreachable database as an
outage, once) and the next round tries again; nothing a round raises ends the process."""

from __future__ import annotations

import logging
import threading

from .outage import describe, is_unreachable, outage

log = logging.getLogger(__name__)


class Periodic(threading.Thread):
    def __init__(self, name: str, interval: float, doing: str):
        super().__init__(name=name, daemon=True)
        self.interval, self.doing = interval, doing
        self._stopped = threading.Event()

    def run_round(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.run_round()
                outage.reached()
            except Exception as exc:
                if is_unreachable(exc):
                    outage.failed(exc, self.doing)
                else:
                    log.error("%s failed: %s", self.doing, describe(exc), exc_info=exc)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self, wait: float = 5.0) -> None:
        """Ends the thread after its current round, waiting for it up to `wait` seconds."""
        self._stopped.set()
        self.join(timeout=wait)
