"""`python -m core.batch_app.api_server`: start the database if needed, migrate, serve."""

from __future__ import annotations

import logging

import uvicorn

from .alerts import init_sentry
from .api.app import create_app
from .api.reads import Reads
from .config import get_settings
from .database import libpq_connection, migrate, migration_url, open_configured
from .domain.keys import list_keys, seed_key
from .logs import configure_logging
from .outage import outage

log = logging.getLogger("core.batch_app.api_server")


def main() -> None:
    settings = get_settings()
    configure_logging("api_server", settings, "api_server")
    init_sentry(settings.sentry_dsn, "api_server")
    url = migration_url(settings)
    outage.retry(lambda: migrate(url), "migrating the database")  # a database down at boot is waited for
    db = open_configured(settings, pool_size=settings.api_database_pool, process="api_server")
    reads = Reads(*libpq_connection(settings, "api_server reads"), size=settings.api_database_pool)
    if settings.api_key:
        def seed() -> None:
            with db.begin() as conn:
                retired, revoked = seed_key(conn, settings.api_key)
            if retired:
                log.warning("API_KEY changed: the key it seeded before no longer works")
            if revoked:
                log.warning("API_KEY is a revoked key: it stays refused; set API_KEY to a new key")

        outage.retry(seed, "seeding API_KEY")
    if settings.open_access:
        log.warning("OPEN_ACCESS is on: any caller without a live key acts in the default project "
                    "(API_HOST %s)", settings.api_host)
    elif not outage.retry(lambda: _any_live_key(db), "reading the API keys"):
        log.warning("no live API key and OPEN_ACCESS is off: every request is refused (401); set API_KEY "
                    "or create one with batchctl keys create")
    uvicorn.run(create_app(settings, db, reads), host=settings.api_host, port=settings.api_port,
                log_level="info", log_config=None, timeout_graceful_shutdown=10, access_log=False)


def _any_live_key(db) -> bool:
    with db.connect() as conn:
        return bool(list_keys(conn))


if __name__ == "__main__":
    main()
