"""`python -m core.batch_app.watchdog`: supervise this host's workers (see supervisor.py).

`batchctl worker reset SLOT` clears a worker stopped at the restart cap.
"""

from __future__ import annotations

import logging
import sys

from .. import alerts
from ..config import get_settings
from ..database import database_url, migrate, open_database
from ..logs import configure_logging
from ..outage import outage
from .supervisor import Supervisor

log = logging.getLogger("core.batch_app.watchdog")


def main() -> int:
    settings = get_settings()
    configure_logging("watchdog", settings, "watchdog")
    url = database_url(settings)
    outage.retry(lambda: migrate(url), "migrating the database")  # a database down at boot is waited for
    db = open_database(url, pool_size=3)  # supervision, housekeeping, and a spare
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
