"""API keys: stored as SHA-256 hashes, each belonging to one project."""

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


def seed_key(conn: Connection, key: str) -> int:
    """Make `key` the default project's seeded key; returns how many earlier seeded keys it retired."""
    retired = conn.execute(api_keys.delete().where(api_keys.c.project == DEFAULT_PROJECT,
                                                   api_keys.c.name == SEEDED_NAME,
                                                   api_keys.c.key_hash != hash_key(key))).rowcount
    add_key(conn, key, DEFAULT_PROJECT, SEEDED_NAME)
    return retired


def list_keys(conn: Connection) -> list:
    """Every key's id, project, name, creation time and the start of its hash (never the key)."""
    return conn.execute(sa.select(api_keys.c.id, api_keys.c.project, api_keys.c.name, api_keys.c.created_at,
                                  sa.func.left(api_keys.c.key_hash, 12).label("hash_prefix"))
                        .order_by(api_keys.c.id)).all()


def revoke_key(conn: Connection, key_id: int) -> bool:
    """Remove a key: the next request that presents it is refused."""
    return conn.execute(api_keys.delete().where(api_keys.c.id == key_id)).rowcount == 1


def create_key(conn: Connection, project: str, name: str = "") -> str:
    key = "sk-batch-" + secrets.token_urlsafe(32)
    add_key(conn, key, project, name)
    return key


_PROJECT_OF = "SELECT (SELECT project FROM api_keys WHERE key_hash = %(key_hash)s), EXISTS (SELECT 1 FROM api_keys)"


def project_of(key: str | None) -> Query[tuple[str | None, bool]]:
    """(the key's project or None, whether any key exists at all)."""
    return Query(_PROJECT_OF, {"key_hash": hash_key(key) if key else ""}, lambda rows: (rows[0][0], rows[0][1]))
