"""The key each managed vLLM server (a `serve` slot) expects, so that a local user who reaches its
loopback port cannot bypass the API's keys.

Derived, never stored or passed on a command line: HMAC-SHA256 of the server's port under a
secret of this host's data directory (DATA_DIR/server-keys.secret, readable by its owner only,
made once). The server (through VLLM_API_KEY in its own environment), its probe and the pool
worker of its model all run on that host with that DATA_DIR, so each computes the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_FILE = "server-keys.secret"


def server_key(data_dir: Path, port: int) -> str:
    """The key of the managed server on `port` of this host."""
    secret = _secret(Path(data_dir) / SECRET_FILE)
    return "sk-server-" + hmac.new(secret, str(port).encode(), hashlib.sha256).hexdigest()


def _secret(path: Path) -> bytes:
    """The host's secret, made on first use: written whole to a file of its own, then linked into
    place, so processes starting at once all read the one that won."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(32))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another process made it first
        finally:
            draft.unlink()
    return path.read_bytes().strip()
