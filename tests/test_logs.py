"""Every process writes its own log in LOG_DIR, rotated by size, each line stamped and named."""

from __future__ import annotations

import httpx

from .conftest import echo_slot, live_worker, log_lines, start_api, start_watchdog, wait_for, wait_for_batch
from .jsonl import request_line, submit


def test_every_line_of_every_log_is_stamped_and_named(database, data_dir, db):
    api = start_api(database, data_dir, "logs-stack")
    watchdog = start_watchdog(database, data_dir, "logs-stack", [echo_slot("log-echo")], HEARTBEAT_INTERVAL="0.5",
                              SHUTDOWN_GRACE="5")
    try:
        wait_for(lambda: live_worker(db, "log-echo"), 60, message="worker up")
        client = api.client()
        batch = wait_for_batch(client, submit(client, [request_line(f"r{i}", "log-echo") for i in range(10)]).id, 60)
        assert batch.status == "completed"
    finally:
        assert watchdog.stop() == 0
        api.stop()

    log_dir = data_dir / "logs" / "logs-stack"
    assert sorted(path.name for path in log_dir.iterdir()) == ["api_server.log", "watchdog.log", "worker-log-echo.log"]
    api_lines = log_lines(log_dir / "api_server.log")
    access = [line for line in api_lines if " core.batch_app.api.access_log: " in line]
    assert any('"POST /v1/batches HTTP/1.1" 200 ' in line and line.endswith(" ms") for line in access), access
    # Successful reads (the client's polling) are not logged by default; what changes something is.
    assert not [line for line in access if '"GET ' in line], access
    assert any("started worker log-echo" in line for line in log_lines(log_dir / "watchdog.log"))
    worker = log_lines(log_dir / "worker-log-echo.log")
    for expected in ("loaded in", "claimed 8 requests", "echo engine ready for log-echo",
                     "stderr: echo engine: a raw write on file descriptor 2", "stopped cleanly"):
        assert any(expected in line for line in worker), expected


def test_a_refused_request_is_logged_and_every_request_with_api_access_log_all(database, data_dir):
    api = start_api(database, data_dir, "logs-access")
    quiet = start_api(database, data_dir, "logs-access-none", API_ACCESS_LOG="none")
    try:
        assert httpx.get(f"{api.base_url}/v1/batches", timeout=10).status_code == 401
        assert httpx.get(f"{api.base_url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{quiet.base_url}/v1/nothing-here", timeout=10).status_code == 404
    finally:
        api.stop()
        quiet.stop()
    lines = log_lines(data_dir / "logs" / "logs-access" / "api_server.log")
    assert any('"GET /v1/batches HTTP/1.1" 401 ' in line for line in lines)
    assert not any('"GET /health HTTP/1.1"' in line for line in lines)
    assert not any("HTTP/1.1" in line for line in log_lines(data_dir / "logs" / "logs-access-none" / "api_server.log"))


def test_logs_rotate_by_size(database, data_dir):
    api = start_api(database, data_dir, "logs-rotation", LOG_MAX_BYTES="20000", LOG_BACKUPS="2", API_ACCESS_LOG="all")
    try:
        with httpx.Client(base_url=api.base_url, timeout=10) as http:
            for _ in range(400):  # one access line of ~150 bytes each: about three files' worth
                http.get("/health")
    finally:
        api.stop()
    log_dir = data_dir / "logs" / "logs-rotation"
    names = sorted(path.name for path in log_dir.iterdir())
    assert names == ["api_server.log", "api_server.log.1", "api_server.log.2"]
    for name in names:
        assert (log_dir / name).stat().st_size <= 20000
        log_lines(log_dir / name)
