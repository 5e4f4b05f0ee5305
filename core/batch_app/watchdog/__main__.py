"""`python -m core.batch_app.watchdog`: supervise this host's workers (see supervisor.py).

`batchctl worker reset SLOT` clears a worker stopped at the restart cap.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from pydantic import ValidationError

from .. import alerts
from ..config import Settings, get_settings
from ..database import migrate, migration_url, open_configured
from ..logs import configure_logging
from ..outage import outage
from .idle_exit import IdleExit
from .supervisor import Supervisor

log = logging.getLogger("core.batch_app.watchdog")


def main() -> int:
    settings = get_settings()
    configure_logging("watchdog", settings, "watchdog")
    url = migration_url(settings)
    outage.retry(lambda: migrate(url), "migrating the database")  # a database down at boot is waited for
    db = open_configured(settings, pool_size=4, process="watchdog")  # supervision, housekeeping, webhooks, and a spare
    alerts.init_sentry(settings.sentry_dsn, "watchdog")
    try:
        if settings.backends.strip() and not settings.workers.strip():
            settings = pool_settings(settings)
        settings.worker_slots()
    except (ValidationError, ValueError) as exc:
        log.error("the worker configuration is invalid (WORKERS or BACKENDS): %s", exc)
        return 2
    supervisor = Supervisor(db, settings)
    supervisor.install_signal_handlers()
    if settings.idle_exit:
        IdleExit(db, settings, supervisor.stopping).start()
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


def pool_settings(settings: Settings) -> Settings:
    """BACKENDS alone: one pool worker per model the backends list in GET /v1/models, served
    under that name. Waits while no backend answers; a backend that does not answer yet joins
    every pool (its health checks tell whether it serves the pool's model once it is up). The
    workers read the same slots from WORKERS, which is set here for them."""
    from ..config import POOL_ENGINE, WorkerSlot, parse_backends, pool_slot_name
    from ..engines.openai_http import served_models

    backends = WorkerSlot(slot="pool", backends=parse_backends(settings.backends)).backends
    delay = 1.0
    while not (found := served_models(backends, settings.backend_api_key))[0]:
        log.warning("no backend of BACKENDS lists its models yet; asking again in %.0f s", delay)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
    models, silent = found
    slots = [WorkerSlot(slot=pool_slot_name(model), model=model, engine=POOL_ENGINE,
                        backends=serving + silent, api_key=settings.backend_api_key, **settings.pool_option_values())
             for model, serving in sorted(models.items())]
    for slot in slots:
        log.info("backends %s serve %s: pool worker %s", ", ".join(b.url for b in slot.backends), slot.model, slot.slot)
    os.environ["WORKERS"] = json.dumps([slot.model_dump(exclude_defaults=True) for slot in slots])
    return Settings(workers=os.environ["WORKERS"])


if __name__ == "__main__":
    sys.exit(main())
