"""Webhook signing secrets at rest: sealed with WEBHOOK_SECRET_KEY, so a copy of the database (a
backup, a replica, a dump in a ticket) does not let its reader forge events.

The key setting is one or more comma-separated strings of any length; each becomes a Fernet key
(AES-128-CBC with HMAC-SHA256, from `cryptography`) through HKDF-SHA256. The first seals, every
one opens, so a key is replaced by putting the new one first; `seal_stored` then reseals with it.
A secret stored before a key was set (plain `whsec_...`) keeps working and is sealed by the next
`seal_stored`. With no key set, secrets are stored as they are, and a warning says so once.
"""

from __future__ import annotations

import base64
import logging
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..config import Settings

log = logging.getLogger(__name__)

SEALED = "sealed:"  # the prefix of a sealed secret; a plain one starts with whsec_


class UnreadableSecret(Exception):
    """A sealed secret that none of the configured keys opens (WEBHOOK_SECRET_KEY changed or unset)."""


def _fernet_key(key: str) -> bytes:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"webhook signing secrets").derive(key.encode())
    return base64.urlsafe_b64encode(derived)


class SecretBox:
    def __init__(self, keys: list[str]):
        self._keys = [Fernet(_fernet_key(key)) for key in keys]
        self._fernet = MultiFernet(self._keys) if self._keys else None

    def seal(self, secret: str) -> str:
        if self._fernet is None:
            return secret
        return SEALED + self._fernet.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        if not stored.startswith(SEALED):
            return stored
        if self._fernet is None:
            raise UnreadableSecret("the signing secret is sealed but WEBHOOK_SECRET_KEY is not set")
        try:
            return self._fernet.decrypt(stored.removeprefix(SEALED).encode()).decode()
        except InvalidToken:
            raise UnreadableSecret("the signing secret is sealed with a key WEBHOOK_SECRET_KEY does not list") from None

    def needs_sealing(self, stored: str) -> bool:
        """Plain text while a key is set, or sealed with a key other than the first."""
        if self._fernet is None:
            return False
        if not stored.startswith(SEALED):
            return True
        try:
            self._keys[0].decrypt(stored.removeprefix(SEALED).encode())
            return False
        except InvalidToken:
            return True


@lru_cache(maxsize=4)
def _box(keys: str) -> SecretBox:
    listed = [key.strip() for key in keys.split(",") if key.strip()]
    if not listed:
        log.warning("WEBHOOK_SECRET_KEY is not set: webhook signing secrets are stored in the database as they are")
    return SecretBox(listed)


def secret_box(settings: Settings) -> SecretBox:
    return _box(settings.webhook_secret_key.get_secret_value())


def seal_stored(conn: Connection, box: SecretBox) -> int:
    """Seals, with the first key, every secret stored in plain text or under an older key; returns
    how many it sealed. An old secret still signing after a rotation is sealed too."""
    sealed = 0
    for row in conn.execute(text("SELECT id, secret, old_secret FROM webhook_endpoints ORDER BY id FOR UPDATE")):
        changes = {}
        for column, value in (("secret", row.secret), ("old_secret", row.old_secret)):
            if value is not None and box.needs_sealing(value):
                try:
                    changes[column] = box.seal(box.open(value))
                except UnreadableSecret as exc:
                    log.error("webhook endpoint %s: %s; it cannot be resealed", row.id, exc)
        if changes:
            conn.execute(text(f"UPDATE webhook_endpoints SET {', '.join(f'{c} = :{c}' for c in changes)} WHERE id = :id"),
                         {"id": row.id, **changes})
            sealed += 1
    return sealed
