"""Migrations run from an empty database to head and back, and match tables.py exactly."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import command

from core.batch_app.database import alembic_config, migrate
from core.batch_app.tables import metadata


def test_empty_database_to_head_without_drift_and_back(database):
    admin = sa.create_engine(database, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    name = f"migrate_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(database).set(database=name).render_as_string(hide_password=False)
    try:
        migrate(url)
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        assert set(sa.inspect(engine).get_table_names()) == set(metadata.tables) | {"alembic_version"}
        command.check(alembic_config(url))  # raises when the revisions and tables.py disagree
        migrate(url)  # running again is a no-op
        command.downgrade(alembic_config(url), "base")
        assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
