"""Health reports the database; readiness fails while the database is unreachable."""

from __future__ import annotations

import httpx

from core.batch_app.config import Settings
from core.batch_app.database import database_url, stop_embedded

from .conftest import start_api


def test_ready_fails_while_the_database_is_down(tmp_path):
    settings = Settings(data_dir=tmp_path / "d", database_url="")
    server = start_api(database_url(settings), tmp_path, "api-ready")
    try:
        assert httpx.get(f"{server.base_url}/ready").status_code == 200
        assert stop_embedded(settings)
        ready = httpx.get(f"{server.base_url}/ready", timeout=30)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "database_unavailable"
        health = httpx.get(f"{server.base_url}/health", timeout=30)
        assert health.status_code == 200 and health.json()["database"].startswith("unreachable")
    finally:
        server.stop()
        stop_embedded(settings)
