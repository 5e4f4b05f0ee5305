"""Starting processes: the API and the watchdog wait for a database that is not there yet,
`scripts/start-all.sh --role api` starts the API alone, and HOST_NAME names the host a
watchdog and its workers register under.

README: "At start-up the API and the watchdog wait for the database", logging the outage once
when it starts (`database unreachable while ...`) and once when it ends (`database reachable
again after ...`); "`--role api` only the API"; "Each host registers under `HOST_NAME`".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa
from openai import OpenAI

from .conftest import (
    API_KEY,
    REPO,
    batchctl,
    echo_slot,
    free_port,
    live_worker,
    running_watchdog,
    scratch_database,
    stack_env,
    start_watchdog,
    wait_for,
    wait_for_batch,
)
from .jsonl import request_line, submit

UNREACHABLE = "database unreachable while migrating the database"
REACHABLE = "database reachable again after"


def database_command(data_dir: Path, action: str) -> str:
    """`python -m core.batch_app.database url|stop` on the embedded PostgreSQL under `data_dir`:
    `url` starts it (initialising it the first time) and prints its URL."""
    env = {**os.environ, "DATA_DIR": str(data_dir), "DATABASE_URL": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "core.batch_app.database", action], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def late_database(data_dir):
    """A PostgreSQL of this test's own, initialised and then stopped: its URL, where nothing answers
    until the test starts it again (`database_command(pg_dir, "url")`)."""
    pg_dir = data_dir / f"late-{uuid.uuid4().hex[:6]}"  # short: the server's socket lives under it
    pg_dir.mkdir()
    url = database_command(pg_dir, "url")
    assert database_command(pg_dir, "stop") == "stopped"
    try:
        yield url, pg_dir
    finally:
        database_command(pg_dir, "stop")


def _log(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_the_api_and_the_watchdog_wait_for_the_database_at_start_up_and_then_serve(late_database, data_dir):
    url, pg_dir = late_database
    model = f"late-echo-{uuid.uuid4().hex[:6]}"
    port = free_port()
    env = stack_env(url, data_dir, f"api-late-{model}", API_PORT=str(port))
    api_log_path = Path(env["LOG_DIR"]) / "api_server.log"
    with open(api_log_path, "ab") as api_output:
        api = subprocess.Popen([sys.executable, "-m", "core.batch_app.api_server"], env=env, cwd=REPO,
                               stdout=api_output, stderr=subprocess.STDOUT)
    watchdog = start_watchdog(url, data_dir, f"watchdog-late-{model}", [echo_slot(model)], HEARTBEAT_INTERVAL="0.5")
    watchdog_log_path = watchdog.log_dir / "watchdog.log"
    try:
        # Both start, find no database, say so once and keep waiting.
        def waiting() -> bool:
            assert api.poll() is None, f"the API exited with {api.returncode}:\n{_log(api_log_path)[-3000:]}"
            assert watchdog.process.poll() is None, \
                f"the watchdog exited with {watchdog.process.returncode}:\n{_log(watchdog_log_path)[-3000:]}"
            return UNREACHABLE in _log(api_log_path) and UNREACHABLE in _log(watchdog_log_path)
        wait_for(waiting, 60, message="both processes to report the database unreachable")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)  # not serving before its database is there

        database_command(pg_dir, "url")  # the database comes up

        health = wait_for(lambda: _health(port), 60, message="the API to answer /health")
        assert health["database"] == "connected"
        wait_for(lambda: REACHABLE in _log(api_log_path) and REACHABLE in _log(watchdog_log_path), 60,
                 message="both processes to report the database reachable")
        for path in (api_log_path, watchdog_log_path):
            assert _log(path).count("database unreachable while") == 1, path  # logged once, not per retry

        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            wait_for(lambda: live_worker(engine, model), 60, message="the watchdog's worker up")
        finally:
            engine.dispose()
        assert f"watchdog supervising {model}" in _log(watchdog_log_path)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        batch = submit(client, [request_line(f"r{i}", model) for i in range(20)])
        done = wait_for_batch(client, batch.id, 120)
        assert done.status == "completed" and done.request_counts.completed == 20
        lines = client.files.content(done.output_file_id).text.splitlines()
        assert sorted(json.loads(line)["custom_id"] for line in lines) == sorted(f"r{i}" for i in range(20))
        assert watchdog.stop() == 0  # and it stops cleanly
    finally:
        api.terminate()
        try:
            api.wait(15)
        except subprocess.TimeoutExpired:
            api.kill()
        watchdog.stop()


def _health(port: int) -> dict | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def _processes_of(data_dir: Path) -> list[str]:
    """The command lines of every process whose DATA_DIR is `data_dir`."""
    found = []
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            if process.pid != os.getpid() and (process.info["environ"] or {}).get("DATA_DIR") == str(data_dir):
                found.append(" ".join(process.info["cmdline"] or []))
        except psutil.Error:
            continue
    return found


def test_start_all_with_role_api_starts_the_api_alone_and_stop_all_stops_it(database, tmp_path):
    data_dir, port = tmp_path / "data", free_port()
    with scratch_database(database) as url:
        # A worker configuration of the echo engine: a watchdog started by mistake would show, and
        # would load no model.
        env = {**os.environ, "DATA_DIR": str(data_dir), "LOG_DIR": str(tmp_path / "logs"), "API_PORT": str(port),
               "API_KEY": API_KEY, "DATABASE_URL": url, "HEARTBEAT_INTERVAL": "1",
               "WORKERS": json.dumps([echo_slot("role-api-echo")])}
        started = subprocess.run([str(REPO / "scripts/start-all.sh"), "--role", "api"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=600)
        try:
            assert started.returncode == 0, started.stdout + started.stderr
            assert f"API ready at http://127.0.0.1:{port} (no workers on this host: --role api)" in started.stdout
            assert "watchdog started" not in started.stdout and "Demo model" not in started.stdout
            processes = _processes_of(data_dir)
            assert [p for p in processes if "core.batch_app" in p] == [
                p for p in processes if "core.batch_app.api_server" in p], processes
            assert len([p for p in processes if "core.batch_app.api_server" in p]) == 1, processes
            assert sorted(path.name for path in (data_dir / "run").iterdir()) == ["api_server.pid"]

            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=60)
            assert client.batches.list().data == []  # it serves, with the key
            assert client.models.list().data == []  # and no worker serves anything
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            try:
                with engine.connect() as conn:
                    assert conn.execute(sa.text("SELECT count(*) FROM workers")).scalar() == 0
                    assert conn.execute(sa.text("SELECT count(*) FROM hosts")).scalar() == 0
            finally:
                engine.dispose()
        finally:
            stopped = subprocess.run([str(REPO / "scripts/stop-all.sh")], env=env, cwd=tmp_path,
                                     capture_output=True, text=True, timeout=300)
        assert stopped.returncode == 0, stopped.stderr
        assert "api_server stopped" in stopped.stdout and "watchdog stopped" not in stopped.stdout
        wait_for(lambda: not _processes_of(data_dir), 30, message="every process of the stack gone")
        assert not (data_dir / "run" / "api_server.pid").exists()
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_an_explicit_host_name_is_the_host_the_watchdog_and_its_workers_record(database, data_dir, db):
    host = f"gpu-box-{uuid.uuid4().hex[:6]}"
    assert host != socket.gethostname()
    slot = f"host-echo-{uuid.uuid4().hex[:6]}"
    with running_watchdog(database, data_dir, f"watchdog-{host}", [echo_slot(slot)], HOST_NAME=host,
                          HEARTBEAT_INTERVAL="0.5") as watchdog:
        worker = wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        with db.connect() as conn:
            assert conn.execute(sa.text("SELECT host FROM workers WHERE id = :w"), {"w": worker.id}).scalar() == host
            # The watchdog's own beat is under that name too (it tells other hosts this one lives).
            wait_for(lambda: conn.execute(sa.text("SELECT 1 FROM hosts WHERE host = :h"), {"h": host}).first(), 30,
                     message="the watchdog's host beat")
            names = set(conn.execute(sa.text("SELECT application_name FROM pg_stat_activity "
                                             "WHERE application_name LIKE :p"), {"p": f"%@{host}"}).scalars())
        assert f"watchdog@{host}" in names and f"worker:{slot}@{host}" in names, names

        table = batchctl(watchdog.env, "workers")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        header = [cell.strip() for cell in next(line for line in lines if "restarts" in line)
                  .replace("┃", "│").split("│")]  # rich draws the header's rules heavier
        [row] = [[cell.strip() for cell in line.split("│")] for line in lines if slot in line]
        assert row[header.index("host")] == host, table.stdout
        assert row[header.index("pid")] == str(worker.pid)
