"""API keys: stored as SHA-256 hashes, each belonging to one project.

A revoked key keeps its row (`revoked_at` set): it stays refused whatever happens next (an API
restart that seeds API_KEY again included), and revoking every key never leaves the server open:
open mode is the OPEN_ACCESS setting alone.
"""

from __future__ import annotations

import hashlib
import secrets

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection

from .query import Query
from .tables import api_keys

DEFAULT_PROJECT = "default"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def add_key(conn: Connection, key: str, project: str, name: str = "") -> None:
    """Register a key; adding one that exists already changes nothing."""
    conn.execute(
        insert(api_keys).values(key_hash=hash_key(key), project=project, name=name)
        .on_conflict_do_nothing(index_elements=["key_hash"])
    )


# The name of the key that API_KEY seeds; a new API_KEY retires the one seeded before.
SEEDED_NAME = "API_KEY"


def seed_key(conn: Connection, key: str) -> tuple[int, bool]:
    """Make `key` the default project's seeded key. Returns how many earlier seeded keys it
    retired, and whether `key` was revoked: it then stays refused, and changes nothing."""
    if conn.execute(sa.select(api_keys.c.revoked_at.is_not(None)).where(api_keys.c.key_hash == hash_key(key))).scalar():
        return 0, True
    retired = conn.execute(api_keys.update().where(api_keys.c.project == DEFAULT_PROJECT,
                                                   api_keys.c.name == SEEDED_NAME,
                                                   api_keys.c.key_hash != hash_key(key),
                                                   api_keys.c.revoked_at.is_(None))
                           .values(revoked_at=sa.func.now())).rowcount
    add_key(conn, key, DEFAULT_PROJECT, SEEDED_NAME)
    return retired, False


def list_keys(conn: Connection) -> list:
    """Every live key's id, project, name, creation time and the start of its hash (never the key)."""
    return conn.execute(sa.select(api_keys.c.id, api_keys.c.project, api_keys.c.name, api_keys.c.created_at,
                                  sa.func.left(api_keys.c.key_hash, 12).label("hash_prefix"))
                        .where(api_keys.c.revoked_at.is_(None)).order_by(api_keys.c.id)).all()


def revoke_key(conn: Connection, key_id: int) -> bool:
    """Revoke a live key: the next request that presents it is refused, for good."""
    return conn.execute(api_keys.update().where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                        .values(revoked_at=sa.func.now())).rowcount == 1


def create_key(conn: Connection, project: str, name: str = "") -> str:
    key = "sk-batch-" + secrets.token_urlsafe(32)
    add_key(conn, key, project, name)
    return key


_PROJECT_OF = "SELECT project, revoked_at IS NOT NULL FROM api_keys WHERE key_hash = %(key_hash)s"


def project_of(key: str) -> Query[tuple[str | None, bool]]:
    """(the key's project, or None for a key never issued; whether it was revoked)."""
    return Query(_PROJECT_OF, {"key_hash": hash_key(key)},
                 lambda rows: (rows[0][0], rows[0][1]) if rows else (None, False))
