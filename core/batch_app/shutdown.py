"""How processes stop: SIGTERM (systemd, the watchdog) and SIGINT (a terminal's Ctrl-C) ask them to,
and the exit code by which a fenced worker says why it stopped."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

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


class StoppedWhileLoading(BaseException):
    """SIGTERM or SIGINT while a worker loads its model. It holds nothing yet, so it stops at once
    rather than after a load that may take minutes (a BaseException, which no `except Exception`
    of the loading code swallows)."""


@contextmanager
def stopped_at_once_by_signals(stopping: threading.Event, logger: logging.Logger, doing: str) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT set `stopping` and raise StoppedWhileLoading in it;
    so does entering it with `stopping` set already (by a signal just before), and so does any
    error the block ends with once a signal came: raised inside an import, the signal's exception
    can leave a library's module half-initialised, which then fails in its own way."""
    def _handler(signum, _frame):
        logger.info("received %s while %s: stopping at once (nothing is held yet)", signal.Signals(signum).name, doing)
        stopping.set()
        raise StoppedWhileLoading

    previous = {signum: signal.signal(signum, _handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        if stopping.is_set():
            raise StoppedWhileLoading
        yield
    except Exception as exc:
        if not stopping.is_set():
            raise
        logger.info("the load ended by the stop signal failed with %s: %s", type(exc).__name__, exc)
        raise StoppedWhileLoading from exc
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
