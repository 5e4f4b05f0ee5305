"""Server slots: the real watchdog runs two real vLLM OpenAI servers on the demo model (one of them
slow: a few sequences at a time) beside one that cannot start, and the pool worker that feeds
them. Each server answers only its own key; one SIGKILLed, stopped, restarted by an operator, the
one that cannot start capped, and the watchdog's own SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import time

import httpx
import psutil
import pytest
import sqlalchemy as sa

from core.batch_app.config import ServerSpec, Settings
from core.batch_app.domain import overview
from core.batch_app.domain.registry import server_load
from core.batch_app.server_keys import server_key
from core.batch_app.vllm_server import vllm_arguments
from core.batch_app.watchdog.process_control import group_members

from .conftest import batchctl, free_port, restarts, start_watchdog, wait_for, wait_for_batch
from .jsonl import request_line, submit
from .sentry_receiver import SentryReceiver
from .vllm_servers import requests_on

pytestmark = pytest.mark.vllm

SERVED = "managed-llama"
POOL = f"pool-{SERVED}"
VLLM_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
# Servers load in seconds with the engine in their own process; HEARTBEAT_TIMEOUT is longer than
# STALL_TIMEOUT so that a stopped server is caught by the progress probe. Two restarts an hour a
# slot: the one that cannot start reaches it; srv-0 and srv-1 are charged one each (kill, stall).
FAST = {"HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TIMEOUT": "30", "STALL_TIMEOUT": "8", "STARTUP_TIMEOUT": "300",
        "RESTART_BACKOFF_MIN": "0.5", "RESTART_BACKOFF_MAX": "1", "SHUTDOWN_GRACE": "10", "MAX_RESTARTS_PER_HOUR": "2",
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
SLOW_SEQUENCES = 4  # srv-0 runs this many requests at once and queues the rest of the pool's 64


def server_slot(name: str, port: int, model: str = "demo", args: list[str] = (), gpus: str = "") -> dict:
    return {"slot": name, "serve": {"model": model, "served_name": SERVED, "port": port, "gpus": gpus,
                                    "args": VLLM_ARGS + list(args)}}


SERVING = ("idle", "busy")
LIVE = ("loading", "no_backend", *SERVING)  # no_backend: a pool worker with no server serving


def slot_row(db, slot: str, statuses=SERVING):
    with db.connect() as conn:
        return conn.execute(sa.text(
            "SELECT id, pid, status, kind, probe, requests_done FROM workers WHERE slot = :slot "
            "AND status = ANY(:statuses) ORDER BY started_at DESC LIMIT 1"),
            {"slot": slot, "statuses": list(statuses)}).first()


def answered(db, port: int) -> int:
    """Requests the pool workers had answered by the server on `port`, as their heartbeats report."""
    with db.connect() as conn:
        return server_load(conn, f"http://127.0.0.1:{port}")[1]


def batch_held_on(client, data_dir, port: int):
    """A 200-request batch, once the server on `port` runs some of it (asked of the server itself)."""
    batch = submit(client, chat_lines(200, max_tokens=32))
    key = server_key(data_dir, port)
    wait_for(lambda: requests_on(f"http://127.0.0.1:{port}", key) > 0, 120, interval=0.05,
             message=f"the server on {port} holding requests")
    return batch


def chat_lines(count: int, max_tokens: int = 32) -> list[dict]:
    return [request_line(f"r{i}", SERVED, max_tokens=max_tokens) for i in range(count)]


def assert_each_once(client, batch, count: int) -> None:
    found = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            found += [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in found) == sorted(f"r{i}" for i in range(count))
    assert batch.request_counts.completed == count, [line.get("error") for line in found if line.get("error")][:3]


def log_stamp(line: str) -> float:
    """The time of one of our log lines (each starts with its ISO-8601 stamp)."""
    from datetime import datetime

    return datetime.fromisoformat(line.split(" ", 1)[0]).timestamp()


@pytest.fixture(scope="module")
def sentry():
    receiver = SentryReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def managed(database, data_dir, db, api, sentry):
    """A watchdog running servers srv-0 (slow), srv-1 and broken-srv-0 (its model is not there), and
    so the pool worker pool-managed-llama with all three as its backends."""
    ports = [free_port(), free_port(), free_port()]
    slots = [server_slot("srv-0", ports[0], args=["--max-num-seqs", str(SLOW_SEQUENCES)]),
             server_slot("srv-1", ports[1], gpus="0"),
             server_slot("broken-srv-0", ports[2], model="/nonexistent/model")]
    watchdog = start_watchdog(database, data_dir, "watchdog-managed", slots, SENTRY_DSN=sentry.dsn, **FAST)
    try:
        for name in ("srv-0", "srv-1", POOL):
            wait_for(lambda: slot_row(db, name), 300, interval=1, message=f"{name} up")
        yield watchdog, ports[:2]
    finally:
        if watchdog.process.poll() is None:
            watchdog.stop()


def test_the_server_arguments_and_environment_are_what_the_slot_says(managed, db):
    spec = ServerSpec(model="/models/llama", served_name="llama", port=8100, gpus="0,1",
                      args=["--tensor-parallel-size", "2"])
    assert vllm_arguments(spec, "/models/llama", "generate", 30) == [
        "--model", "/models/llama", "--served-model-name", "llama", "--host", "127.0.0.1", "--port", "8100",
        "--shutdown-timeout", "30", "--tensor-parallel-size", "2"]
    assert "--shutdown-timeout" not in vllm_arguments(spec.model_copy(update={"args": ["--shutdown-timeout=5"]}),
                                                      "/m", "generate", 30)[:-1]
    # The pool worker of the two server slots, with both as its backends.
    settings = Settings(workers=json.dumps([server_slot("a", 1), server_slot("b", 2)]))
    pool = settings.worker_slot(POOL)
    assert pool.engine == "openai-http" and pool.model == SERVED
    assert [b.url for b in pool.backends] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    # What the watchdog passed to the running servers: their GPUs, their command.
    first, second = slot_row(db, "srv-0"), slot_row(db, "srv-1")
    assert "CUDA_VISIBLE_DEVICES" not in psutil.Process(first.pid).environ()
    assert psutil.Process(second.pid).environ()["CUDA_VISIBLE_DEVICES"] == "0"
    assert "core.batch_app.vllm_server" in " ".join(psutil.Process(second.pid).cmdline())


def pool_backend_states(db) -> dict[str, str]:
    """The state of each server as the pool worker's own health checks see it."""
    with db.connect() as conn:
        return {row.url: row.state for row in overview.backends(conn) if row.slot == POOL}


def test_a_batch_runs_across_both_servers(managed, db, client):
    watchdog, ports = managed
    # The watchdog's checks passing is not enough: the pool worker sends to a server once its own do.
    wait_for(lambda: all(pool_backend_states(db).get(f"http://127.0.0.1:{port}") == "healthy" for port in ports),
             120, message="the pool worker sending to both servers")
    before = [answered(db, port) for port in ports]
    done = wait_for_batch(client, submit(client, chat_lines(120)).id, 300)
    assert done.status == "completed"
    assert_each_once(client, done, 120)
    wait_for(lambda: all(answered(db, port) > was for port, was in zip(ports, before, strict=True)), 15,
             message="both servers used")
    listed = batchctl(watchdog.env, "workers")
    assert listed.returncode == 0, listed.stderr
    for name in ("srv-0", "srv-1"):
        assert re.search(rf"{name}\s+│\s+server\s+│\s+(idle|busy)", listed.stdout), listed.stdout
    assert "healthy (" in listed.stdout
    log = (watchdog.log_dir / "server-srv-0.log").read_text(errors="replace").splitlines()
    assert log and all(re.match(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00 server:srv-0\[\d+\] ", line) for line in log[-20:])
    # vLLM's own loggers (not our wrapper's first line, which names vLLM too), stamped as ours.
    assert any(re.search(r" server:srv-0\[\d+\] INFO vllm\.entrypoints\.\S+: ", line) for line in log)


def test_a_server_answers_only_its_key_which_no_log_or_command_line_shows(managed, data_dir, db):
    watchdog, ports = managed
    key = server_key(data_dir, ports[0])
    models = f"http://127.0.0.1:{ports[0]}/v1/models"
    assert status_of(models) == 401 and status_of(models, "sk-guess") == 401 and status_of(models, key) == 200
    # The watchdog's probe and the pool worker (whose batches the test above ran) send it.
    assert slot_row(db, "srv-0").probe.startswith("healthy")
    logs = "".join(path.read_text(errors="replace") for path in watchdog.log_dir.glob("*.log"))
    assert key not in logs and key not in " ".join(psutil.Process(slot_row(db, "srv-0").pid).cmdline())


def status_of(url: str, key: str | None = None) -> int:
    return httpx.get(url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=5).status_code


def test_a_server_that_cannot_start_is_capped_while_a_slow_one_carries_batches(managed, db, client, sentry):
    watchdog, ports = managed
    done = wait_for_batch(client, submit(client, chat_lines(40, max_tokens=32)).id, 300)
    assert done.status == "completed"
    assert_each_once(client, done, 40)
    [error] = wait_for(lambda: [e for e in sentry.messages("error") if e.get("tags", {}).get("slot") == "broken-srv-0"],
                       120, message="the error event at the cap")
    assert "reached 2 restarts" in error["message"]
    time.sleep(2)  # nothing more happens once the cap is reached
    assert len(restarts(db, "broken-srv-0")) == 2 and len(sentry.messages("error")) == 1
    assert "server broken-srv-0 cannot start: model /nonexistent/model: no such file or directory" in \
        (watchdog.log_dir / "server-broken-srv-0.log").read_text()
    # srv-0 runs a few requests at a time and holds the rest of what the pool sends it in its
    # queue: slow, but answering, so the progress probe leaves it alone.
    assert answered(db, ports[0]) > 0 and restarts(db, "srv-0") == []


def test_a_killed_server_is_restarted_and_its_requests_retried(managed, data_dir, db, client, sentry):
    watchdog, ports = managed
    victim = wait_for(lambda: slot_row(db, "srv-0"), 300, interval=1, message="srv-0 serving")
    batch = batch_held_on(client, data_dir, ports[0])
    group = group_members(victim.pid)
    killed_at = time.time()
    psutil.Process(victim.pid).send_signal(signal.SIGKILL)
    done = wait_for_batch(client, batch.id, 300)
    assert done.status == "completed"
    assert_each_once(client, done, 200)
    # The batch may finish on the other server before the watchdog has killed the rest of the group.
    wait_for(lambda: all(not member.is_running() or member.status() == psutil.STATUS_ZOMBIE for member in group), 30,
             message="the killed server's process group gone")
    assert not group_members(victim.pid)
    [restart] = wait_for(lambda: restarts(db, "srv-0"), 30, message="the restart recorded")
    assert "killed by SIGKILL" in restart.reason
    wait_for(lambda: [e for e in sentry.messages("warning") if e.get("tags", {}).get("slot") == "srv-0"], 30,
             message="a warning event for srv-0")
    pool_log = (watchdog.log_dir / f"worker-{POOL}.log").read_text(errors="replace")
    retried = [line for line in pool_log.splitlines() if f"backend http://127.0.0.1:{ports[0]} failed request" in line]
    assert retried and all(re.search(r"(ServerDisconnectedError|ClientOSError|ClientPayloadError|"
                                     r"ClientConnectorError): \S", line) for line in retried), retried[:3]
    detected = next(line for line in (watchdog.log_dir / "watchdog.log").read_text().splitlines()
                    if "server srv-0" in line and "killed by SIGKILL" in line)
    print(f"crash detected {log_stamp(detected) - killed_at:.2f} s after the SIGKILL")
    wait_for(lambda: slot_row(db, "srv-0"), 300, interval=1, message="srv-0 back")


def test_a_stopped_server_is_caught_by_the_progress_probe_and_restarted(managed, db, client):
    watchdog, ports = managed
    frozen = wait_for(lambda: slot_row(db, "srv-1"), 300, interval=1, message="srv-1 serving")
    # Stopped just before the batch, whatever the machine's speed: its socket still takes the
    # pool's requests (the kernel accepts them) and none is answered, until the pool's health
    # checks (every 10 s, each waiting 5 s) take it out of rotation, after the 8 s STALL_TIMEOUT.
    stopped_at = time.time()
    for member in group_members(frozen.pid):
        member.send_signal(signal.SIGSTOP)
    batch = submit(client, chat_lines(200, max_tokens=32))
    done = wait_for_batch(client, batch.id, 300)
    assert done.status == "completed"
    assert_each_once(client, done, 200)
    # A stopped server resumed by the kill's SIGCONT may answer what it held, and the batch end,
    # before the restart is recorded.
    [restart] = wait_for(lambda: restarts(db, "srv-1"), 30, message="the restart recorded")
    assert re.search(r"no request completed for \d+ s while holding \d+", restart.reason), restart.reason
    assert not group_members(frozen.pid)
    detected = next(line for line in (watchdog.log_dir / "watchdog.log").read_text().splitlines()
                    if "server srv-1" in line and "no request completed" in line)
    print(f"stall detected {log_stamp(detected) - stopped_at:.2f} s after the SIGSTOP")
    wait_for(lambda: slot_row(db, "srv-1"), 300, interval=1, message="srv-1 back")


def test_an_operator_restart_loses_and_repeats_nothing(managed, db, client):
    watchdog, ports = managed
    old = slot_row(db, "srv-0")
    charged = len(restarts(db, "srv-0"))
    batch = submit(client, chat_lines(200))
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed > 20, 120, message="running")
    asked = batchctl(watchdog.env, "server", "restart", "srv-0")
    assert asked.returncode == 0 and "restart asked" in asked.stdout, asked.stderr
    done = wait_for_batch(client, batch.id, 300)
    assert done.status == "completed"
    assert_each_once(client, done, 200)
    new = wait_for(lambda: (row := slot_row(db, "srv-0", LIVE)) and row.id != old.id and row, 300, interval=1,
                   message="srv-0 started again")
    assert new.pid != old.pid and not group_members(old.pid)
    assert len(restarts(db, "srv-0")) == charged  # not counted against the cap
    # Stopped gracefully, or killed when still answering what it held after SHUTDOWN_GRACE: uncharged either way.
    assert re.search(r"server srv-0 (restarted at an operator's request \(process [^)]*\)|did not stop within \d+ s of an "
                     r"operator's restart); starting it again \(not counted", (watchdog.log_dir / "watchdog.log").read_text())
    refused = batchctl(watchdog.env, "server", "restart", POOL)
    assert refused.returncode != 0 and "no server slot" in refused.stderr


def test_sigterm_to_the_watchdog_stops_the_servers_and_leaves_no_vllm_process(managed, db):
    watchdog, _ = managed
    # srv-0, restarted by the operator above, may still be loading: stopped all the same.
    pids = [wait_for(lambda name=name: slot_row(db, name, LIVE), 60, message=f"{name} started").pid
            for name in ("srv-0", "srv-1", POOL)]
    groups = {pid: group_members(pid) for pid in pids}
    assert watchdog.stop() == 0
    for pid, members in groups.items():
        assert not group_members(pid)
        assert all(not member.is_running() or member.status() == psutil.STATUS_ZOMBIE for member in members)
    with db.connect() as conn:
        statuses = dict(conn.execute(sa.text(
            "SELECT DISTINCT ON (slot) slot, status FROM workers WHERE slot IN ('srv-0', 'srv-1', :pool) "
            "ORDER BY slot, started_at DESC"), {"pool": POOL}).all())
    assert statuses == {"srv-0": "stopped", "srv-1": "stopped", POOL: "stopped"}
