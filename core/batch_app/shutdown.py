"""How processes stop: SIGTERM (systemd, the watchdog) and SIGINT (a terminal's Ctrl-C) ask them to,
and the exit code by which a fenced worker says why it stopped."""

from __future__ import annotations

import logging
import signal
import threading

# Exit code of a worker that learns it was declared dead: its work has been handed to others, and
# the watchdog starts it again without counting a crash.
FENCED_EXIT_CODE = 75


def stop_on_signals(stopping: threading.Event, logger: logging.Logger, consequence: str) -> None:
    """SIGTERM and SIGINT set `stopping`; the main loop then shuts down in its own way."""
    def _handler(signum, _frame):
        logger.info("received %s: %s", signal.Signals(signum).name, consequence)
        stopping.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
