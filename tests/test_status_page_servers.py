"""The status page shows server slots as README promises: each with kind `server`, its status, the
age of its heartbeat, its restarts in the last hour and its last health check, and a server's
restart with its reason among the latest restarts. A real watchdog runs two server slots whose
vLLM is the stand-in of tests/fake_vllm: one healthy, one that never passes a check."""

from __future__ import annotations

import re
from html import unescape

import httpx
import sqlalchemy as sa

from .conftest import API_KEY, REPO, free_port, running_watchdog, wait_for
from .fake_vllm import fake_model, fake_stack, server_slot

HEALTHY, NEVER, SERVED = "page-srv-0", "page-never-0", "page-llama"
COLUMNS = ["slot", "kind", "status", "last heartbeat", "in flight", "requests done", "restarts (1 h)", "model",
           "health check", "pid", "host", "SLURM job"]


def cells_of(page: str, first_cell: str) -> list[list[str]]:
    """The rows of the page's tables whose first cell is `first_cell`, each as its cells' text."""
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", page, re.S)
    cells = [[unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
             for row in rows]
    return [row for row in cells if row and row[0] == first_cell]


def newest(db, slot: str):
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT pid, status, probe FROM workers WHERE slot = :slot "
                                    "ORDER BY started_at DESC LIMIT 1"), {"slot": slot}).first()


def restart_count(db, slot: str) -> int:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM worker_restarts WHERE slot = :slot"), {"slot": slot}).scalar()


def test_the_status_page_shows_server_slots_with_their_last_health_check_and_restarts(
        database, data_dir, db, api, tmp_path):
    model = fake_model(tmp_path / "model")
    slots = [server_slot(HEALTHY, free_port(), model, SERVED),
             server_slot(NEVER, free_port(), model, SERVED, health="never")]
    # STARTUP_TIMEOUT leaves the healthy server and the pool worker time to start on a busy machine.
    with running_watchdog(database, data_dir, "watchdog-status-page", slots, HEARTBEAT_INTERVAL="1",
                          STARTUP_TIMEOUT="8", MAX_RESTARTS_PER_HOUR="1", RESTART_BACKOFF_MIN="0.5",
                          **fake_stack(tmp_path / "records", REPO)) as watchdog:
        healthy = wait_for(lambda: (row := newest(db, HEALTHY)) and row.status == "idle" and row, 60,
                           message="the healthy server's first passed check")
        # The other failed to start, was started again once (the cap), failed again and stays down.
        log = watchdog.log_dir / "watchdog.log"
        wait_for(lambda: f"Server {NEVER} reached 1 restarts in an hour and is left stopped" in log.read_text(), 60,
                 message="the failing server left stopped at the cap")
        assert restart_count(db, NEVER) == 1 and newest(db, NEVER).status == "dead"
        page = httpx.get(f"{api.base_url}/", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert page.status_code == 200, page.text
        html = page.text

    [up] = [dict(zip(COLUMNS, row, strict=True)) for row in cells_of(html, HEALTHY)]
    assert (up["kind"], up["status"], up["model"], up["pid"]) == ("server", "idle", SERVED, str(healthy.pid))
    assert re.fullmatch(r"\d+ s ago", up["last heartbeat"]), up
    assert re.fullmatch(r"healthy \(\d+ ms\)", up["health check"]), up
    assert up["restarts (1 h)"] == "0"

    [down] = [dict(zip(COLUMNS, row, strict=True)) for row in cells_of(html, NEVER) if len(row) == len(COLUMNS)]
    assert (down["kind"], down["status"], down["restarts (1 h)"]) == ("server", "dead", "1"), down
    assert down["health check"].startswith("GET /health: ConnectError: "), down

    # Among the latest restarts (when, worker, reason, exit code, host), with the reason in words.
    [restart] = [row for row in re.findall(r"<tr>(.*?)</tr>", html, re.S) if f"<td>{NEVER}</td>" in row
                 and "start-up timeout" in row]
    assert re.search(r"did not pass a health check within the start-up timeout of 8 s \(GET /health: ConnectError: ",
                     unescape(restart)), restart
