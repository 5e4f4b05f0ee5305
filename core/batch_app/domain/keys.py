"""API keys: stored as SHA-256 hashes, each belonging to one project."""

from __future__ import annotations

import hashlib
import secrets

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection

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


def create_key(conn: Connection, project: str, name: str = "") -> str:
    key = "sk-batch-" + secrets.token_urlsafe(32)
    add_key(conn, key, project, name)
    return key


def project_of(conn: Connection, key: str | None) -> tuple[str | None, bool]:
    """(the key's project or None, whether any key exists at all) in one query."""
    row = conn.execute(
        sa.text("SELECT (SELECT project FROM api_keys WHERE key_hash = :h),"
                " EXISTS (SELECT 1 FROM api_keys)"),
        {"h": hash_key(key) if key else ""},
    ).one()
    return row[0], row[1]
