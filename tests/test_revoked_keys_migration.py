"""Revision 0015 onto a database that holds keys and batches: every key keeps working, revoking
one keeps its row; going back deletes the revoked ones (without the column they would work again)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command

from core.batch_app.database import alembic_config
from core.batch_app.domain.keys import hash_key, revoke_key

from .test_migrations import database_at


def test_keys_keep_working_and_revoked_ones_never_come_back(database):
    with database_at(database, "0014") as (url, scratch):
        with scratch.begin() as conn:
            for key, project in (("sk-old-a", "a"), ("sk-old-b", "b")):
                conn.execute(sa.text("INSERT INTO api_keys (key_hash, project) VALUES (:h, :p)"),
                             {"h": hash_key(key), "p": project})
            conn.execute(sa.text("INSERT INTO batches (id, project, endpoint, input_file_id, completion_window, "
                                 "status) VALUES ('batch_m', 'a', '/v1/chat/completions', 'file-x', '24h', "
                                 "'in_progress')"))
        command.upgrade(alembic_config(url), "0015")
        with scratch.begin() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")).scalar() == 2
            key_id = conn.execute(sa.text("SELECT id FROM api_keys WHERE project = 'b'")).scalar()
            assert revoke_key(conn, key_id)
            assert conn.execute(sa.text("SELECT count(*) FROM api_keys")).scalar() == 2  # the row stays
            assert conn.execute(sa.text("SELECT count(*) FROM batches WHERE project = 'a' AND status NOT IN "
                                        "('completed', 'failed', 'expired', 'cancelled')")).scalar() == 1
        command.downgrade(alembic_config(url), "0014")
        with scratch.connect() as conn:
            assert conn.execute(sa.text("SELECT project FROM api_keys")).scalars().all() == ["a"]
