"""How a process is asked to stop: SIGTERM (systemd, the watchdog) and SIGINT (a terminal's Ctrl-C)."""

from __future__ import annotations

import logging
import signal
import threading


def stop_on_signals(stopping: threading.Event, logger: logging.Logger, consequence: str) -> None:
    """SIGTERM and SIGINT set `stopping`; the main loop then shuts down in its own way."""
    def _handler(signum, _frame):
        logger.info("received %s: %s", signal.Signals(signum).name, consequence)
        stopping.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
