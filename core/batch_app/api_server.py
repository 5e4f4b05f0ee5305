"""`python -m core.batch_app.api_server`: start the database if needed, migrate, serve."""

from __future__ import annotations

import logging

import uvicorn

from .alerts import init_sentry
from .config import get_settings
from .api.app import create_app
from .api.reads import Reads
from .database import libpq_connection, migrate, migration_url, open_configured
from .domain.keys import seed_key
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
                if seed_key(conn, settings.api_key):
                    log.warning("API_KEY changed: the key it seeded before no longer works")

        outage.retry(seed, "seeding API_KEY")
    uvicorn.run(create_app(settings, db, reads), host=settings.api_host, port=settings.api_port,
                log_level="info", log_config=None, timeout_graceful_shutdown=10, access_log=False)


if __name__ == "__main__":
    main()
