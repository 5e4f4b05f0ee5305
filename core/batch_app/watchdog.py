"""`python -m core.batch_app.watchdog`: supervise this host's workers (see supervisor.py).

`python -m core.batch_app.watchdog reset SLOT` clears a worker stopped at the restart cap.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from . import alerts
from .config import get_settings
from .database import create_db_engine, database_url, migrate
from .logs import configure_logging
from .supervisor import Supervisor
from .workers import reset_restarts

log = logging.getLogger("core.batch_app.watchdog")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.batch_app.watchdog")
    sub = parser.add_subparsers(dest="command")
    reset = sub.add_parser("reset", help="clear a worker stopped at the restart cap")
    reset.add_argument("slot")
    args = parser.parse_args(argv)

    settings = get_settings()
    configure_logging("watchdog")
    url = database_url(settings)
    migrate(url)
    db = create_db_engine(url, pool_size=3)
    if args.command == "reset":
        with db.begin() as conn:
            reset_restarts(conn, socket.gethostname(), args.slot)
        print(f"worker {args.slot} reset: the watchdog starts it again within a second")
        return 0

    alerts.init_sentry(settings.sentry_dsn, "watchdog")
    supervisor = Supervisor(db, settings)
    supervisor.install_signal_handlers()
    log.info("watchdog supervising %s", ", ".join(slot.config.slot for slot in supervisor.slots))
    try:
        supervisor.run()
    except Exception as exc:
        log.exception("watchdog failed: %s: %s", type(exc).__name__, exc)
        if settings.sentry_dsn:
            import sentry_sdk

            sentry_sdk.capture_exception(exc)
        supervisor.stop_all()
        return 1
    finally:
        alerts.flush()
    log.info("watchdog stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
