"""Health reports the database; readiness fails while the database is unreachable."""

from __future__ import annotations

import httpx

from core.batch_app.config import Settings
from core.batch_app.database import database_url, stop_embedded

from .conftest import start_api, wait_for


def test_ready_fails_while_the_database_is_down(tmp_path):
    settings = Settings(data_dir=tmp_path / "d", database_url="")
    server = start_api(database_url(settings), tmp_path, "api-ready")
    try:
        assert httpx.get(f"{server.base_url}/ready").status_code == 200
        assert stop_embedded(settings)
        ready = httpx.get(f"{server.base_url}/ready", timeout=30)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "database_unavailable"
        # /health answers from the background check at once, which notices within seconds.
        health = wait_for(lambda: (h := httpx.get(f"{server.base_url}/health", timeout=1)).json()["database"]
                          .startswith("unreachable") and h, 10, message="health reporting the outage")
        assert health.status_code == 200
    finally:
        server.stop()
        stop_embedded(settings)
