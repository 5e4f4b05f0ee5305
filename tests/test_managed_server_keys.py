"""A managed vLLM server answers only requests carrying its key, which its pool worker and probe
send and which no log, command line or database row shows."""

from __future__ import annotations

import httpx
import psutil
import pytest
import sqlalchemy as sa

from core.batch_app.domain import overview
from core.batch_app.server_keys import server_key
from core.batch_app.vllm_server import redacted

from .conftest import free_port, live_worker, running_watchdog, wait_for, wait_for_batch
from .jsonl import request_line, submit

pytestmark = pytest.mark.vllm

SERVED = "keyed-llama"
FAST = {"HEARTBEAT_INTERVAL": "1", "STARTUP_TIMEOUT": "300", "SHUTDOWN_GRACE": "10",
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def test_a_key_on_the_command_line_is_never_logged():
    assert redacted(["--model", "m", "--api-key", "sk-1", "--api-key=sk-2", "--port", "8000"]) == \
        ["--model", "m", "--api-key", "***", "--api-key=***", "--port", "8000"]


def test_each_server_of_a_host_has_its_own_lasting_key(tmp_path):
    first, second = server_key(tmp_path, 8000), server_key(tmp_path, 8001)
    assert first != second and first == server_key(tmp_path, 8000) and len(first) > 40
    assert (tmp_path / "server-keys.secret").stat().st_mode & 0o077 == 0  # its owner's only
    assert server_key(tmp_path / "other-host", 8000) != first


@pytest.mark.vllm
def test_a_managed_server_refuses_requests_without_its_key(database, data_dir, db, client):
    port = free_port()
    slot = {"slot": "keyed-0", "serve": {"model": "demo", "served_name": SERVED, "port": port,
                                         "args": ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]}}
    with running_watchdog(database, data_dir, "watchdog-keyed", [slot], **FAST) as watchdog:
        wait_for(lambda: _status(f"http://127.0.0.1:{port}/health") == 200, 300, interval=1, message="server up")
        key = server_key(data_dir, port)
        models = f"http://127.0.0.1:{port}/v1/models"
        assert _status(models) == 401 and _status(models, "sk-guess") == 401 and _status(models, key) == 200
        wait_for(lambda: _pool_state(db, port) == "healthy", 120, interval=1, message="the pool's check passing")
        # Its next beat says it serves: until then the API refuses a batch for the model (503).
        wait_for(lambda: live_worker(db, "pool-" + SERVED), 30, interval=0.5, message="the pool worker serving")
        done = wait_for_batch(client, submit(client, [request_line(f"r{i}", SERVED, max_tokens=4)
                                                      for i in range(4)]).id, 300)
        assert (done.status, done.request_counts.completed) == ("completed", 4)  # the pool sends the key
        with db.connect() as conn:
            assert conn.execute(sa.text("SELECT probe FROM workers WHERE slot = 'keyed-0' ORDER BY started_at DESC "
                                        "LIMIT 1")).scalar().startswith("healthy")
        logs = "".join(path.read_text(errors="replace") for path in watchdog.log_dir.glob("*.log"))
        server = next(p for p in psutil.Process(watchdog.process.pid).children(recursive=True)
                      if "core.batch_app.vllm_server" in " ".join(p.cmdline()))
        assert key not in logs and key not in " ".join(server.cmdline())


def _pool_state(db, port: int) -> str | None:
    """The state the pool worker of the server's model reports of it (its checks send the key)."""
    with db.connect() as conn:
        return next((row.state for row in overview.backends(conn) if row.url == f"http://127.0.0.1:{port}"), None)


def _status(url: str, key: str | None = None) -> int:
    try:
        return httpx.get(url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=5).status_code
    except httpx.HTTPError:
        return 0
