"""Many hosts on one PostgreSQL, on one machine: host A runs PostgreSQL, PgBouncer and the API;
hosts B and C each run `scripts/start-all.sh --role worker` (a watchdog and an echo worker)
against A over their own links (see tests/hosts.py). A batch shared by B and C, B lost whole,
B's worker frozen, C cut off and back, the same through PgBouncer in transaction mode, and every
host's view. A host lost or cut off charges no request a crash; a worker hung on a live host does."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from core.batch_app.database import open_database

from .conftest import cannot_run, require_tool, wait_for, wait_for_batch
from .hosts import Cluster, Network, postgres_url
from .jsonl import request_line, submit

MODEL = "echo-model"
SLOT = {"slot": "echo-0", "model": "/models/echo", "served_name": MODEL, "engine": "tests.engines:EchoEngine",
        "max_in_flight": 16}
API_PORT, PGBOUNCER_PORT, POOLED_API_PORT = 4080, 6432, 4081
HEARTBEAT_TIMEOUT = 5
# The hosts' settings: heartbeats and rescue in seconds, echo answers slow enough to be caught
# mid-batch, finished batches' request rows kept (the tests read their attempts and crashes).
FAST = {"HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT), "HOUSEKEEPING_INTERVAL": "1",
        "WATCHDOG_CHECK_INTERVAL": "0.5", "RESTART_BACKOFF_MIN": "0.5", "ECHO_STEP_SECONDS": "0.1",
        "MIN_COMPLETION_WINDOW": "1", "SHUTDOWN_GRACE": "10", "FINISHED_REQUESTS_RETENTION": "3600"}


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        cannot_run("network namespaces need root")
    require_tool("ip", package="iproute2")
    require_tool("unshare", package="util-linux")
    # Not under pytest's own temporary folder, which a test session starting meanwhile makes
    # readable by root alone, PostgreSQL's system user included.
    with Network("host-a", ["host-b", "host-c"]) as net, tempfile.TemporaryDirectory(prefix="vbs-hosts-") as root:
        cluster = Cluster(net, Path(root), [SLOT], FAST)
        cluster.b, cluster.c = net.hosts["host-b"], net.hosts["host-c"]
        try:
            cluster.start_postgres()
            cluster.start_pgbouncer()
            cluster.client = cluster.start_api(API_PORT, DATABASE_URL=postgres_url("127.0.0.1"))
            cluster.db = open_database(postgres_url(net.hub.hub_address).replace("postgresql://",
                                                                                 "postgresql+psycopg://"))
            for host in (cluster.b, cluster.c):
                cluster.start_worker_host(host)
            for host in (cluster.b, cluster.c):
                wait_for(lambda: live_workers(cluster.db, host.name), 120, interval=0.5, message=f"{host.name}'s worker")
            yield cluster
        finally:
            if hasattr(cluster, "db"):
                cluster.db.dispose()
            cluster.stop()


def log_sizes(cluster, names: list[str]) -> dict[tuple[str, str], int]:
    return {(host.name, name): (cluster.root / host.name / "logs" / name).stat().st_size
            for host in (cluster.b, cluster.c) for name in names}


def live_workers(db, host: str) -> list:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT id, pid, status FROM workers WHERE host = :h AND kind = 'worker' "
                                    "AND status IN ('idle', 'busy')"), {"h": host}).all()


def worker_ids(db, host: str) -> set[str]:
    with db.connect() as conn:
        return {str(row.id) for row in conn.execute(sa.text("SELECT id FROM workers WHERE host = :h"), {"h": host})}


def stored_by(db, batch_id: str) -> dict[str, set[str]]:
    """custom_id -> the hosts whose workers stored its result (exactly one each when all is well)."""
    with db.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT r.custom_id, w.host FROM batch_requests r JOIN workers w ON w.id = r.worker_id "
            "WHERE r.batch_id = :b AND r.status = 'succeeded'"), {"b": batch_id}).all()
    found: dict[str, set[str]] = {}
    for custom_id, host in rows:
        found.setdefault(custom_id, set()).add(host)
    return found


def held_by(db, batch_id: str, host: str) -> dict[str, str]:
    """custom_id -> worker id of the requests of the batch running on the host's workers."""
    with db.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT r.custom_id, CAST(r.worker_id AS text) FROM batch_requests r JOIN workers w ON w.id = r.worker_id "
            "WHERE r.batch_id = :b AND r.status = 'running' AND w.host = :h"), {"b": batch_id, "h": host}).all())


def restarts(db, host: str) -> list:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT slot, reason FROM worker_restarts WHERE host = :h AND reason <> 'reset'"),
                            {"h": host}).all()


def charged_crashes(db, batch_id: str) -> dict[str, int]:
    """custom_id -> crashes, of every request of the batch charged a crash (read from each row)."""
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT custom_id, crashes FROM batch_requests WHERE batch_id = :b"),
                            {"b": batch_id}).all()
    assert rows
    return {custom_id: crashes for custom_id, crashes in rows if crashes}


def causes(db, worker_ids) -> set[tuple[str, str]]:
    """(cause, declaring host) of the deaths of these workers."""
    with db.connect() as conn:
        return {tuple(row) for row in conn.execute(sa.text(
            "SELECT cause, declared_by FROM worker_deaths WHERE worker_id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": list(worker_ids)})}


def lines(count: int) -> list[dict]:
    return [request_line(f"r{i}", MODEL, max_tokens=8) for i in range(count)]


def assert_each_once(client, batch, count: int) -> None:
    found = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            found += [json.loads(line)["custom_id"] for line in client.files.content(file_id).text.splitlines()]
    assert sorted(found) == sorted(f"r{i}" for i in range(count))


def running_batch(cluster, client, count: int, host) -> object:
    """A batch of `count` lines, once the host's workers hold some of it."""
    batch = submit(client, lines(count))
    wait_for(lambda: held_by(cluster.db, batch.id, host.name), 60, interval=0.1,
             message=f"{host.name} holding requests")
    return batch


def test_a_batch_is_shared_by_the_workers_of_two_hosts_exactly_once(cluster):
    done = wait_for_batch(cluster.client, submit(cluster.client, lines(400)).id, 120)
    assert done.status == "completed" and done.request_counts.completed == 400
    assert_each_once(cluster.client, done, 400)
    hosts = stored_by(cluster.db, done.id)
    assert all(len(stored) == 1 for stored in hosts.values())
    assert set().union(*hosts.values()) == {"host-b", "host-c"}


def test_every_host_sees_the_same_workers(cluster):
    def view(host, env) -> list[tuple]:
        listed = host.run([str(Path(sys.executable).parent / "batchctl"), "workers"], {**env, "COLUMNS": "250"})
        assert listed.returncode == 0, listed.stderr
        rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in listed.stdout.splitlines()
                if line.startswith("│")]
        # slot, kind, status, model, pid, host: the heartbeat's age moves between the readings, and
        # so may a worker between idle and busy
        return sorted((row[0], row[1], "serving" if row[2] in ("idle", "busy") else row[2], row[6], row[7], row[8])
                      for row in rows if row[0])

    views = {host.name: view(host, env) for host, env in (
        (cluster.hub, cluster.env("a", DATABASE_URL=postgres_url("127.0.0.1"))),
        (cluster.b, cluster.worker_env(cluster.b)), (cluster.c, cluster.worker_env(cluster.c)))}
    assert views["host-a"] == views["host-b"] == views["host-c"], views
    assert {row[5] for row in views["host-a"] if row[2] == "serving"} == {"host-b", "host-c"}
    # Each process's connections carry its name and host, so an operator sizing max_connections sees who holds them.
    with cluster.db.connect() as conn:
        held = dict(conn.execute(sa.text(
            "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = 'batches' "
            "AND backend_type = 'client backend' GROUP BY 1")).all())
    print(f"connections by process: {held}")
    for name in ("worker:echo-0@host-b", "watchdog@host-b", "worker:echo-0@host-c", "watchdog@host-c",
                 "api_server@host-a"):
        assert held.get(name, 0) >= 1, held


def test_a_host_lost_whole_loses_and_repeats_nothing(cluster):
    batch = running_batch(cluster, cluster.client, 1200, cluster.b)
    lost_workers = worker_ids(cluster.db, "host-b")
    held = held_by(cluster.db, batch.id, "host-b")
    killed = cluster.b.kill_everything()  # the watchdog and its worker, at once
    assert len(killed) >= 2
    done = wait_for_batch(cluster.client, batch.id, 180)
    assert done.status == "completed" and done.request_counts.completed == 1200
    assert_each_once(cluster.client, done, 1200)
    stored = stored_by(cluster.db, batch.id)
    assert all(stored[custom_id] == {"host-c"} for custom_id in held)  # what B held ran on C
    with cluster.db.connect() as conn:
        statuses = conn.execute(sa.text("SELECT DISTINCT status FROM workers WHERE id = ANY(CAST(:ids AS uuid[]))"),
                                {"ids": list(lost_workers)}).scalars().all()
    assert set(statuses) <= {"dead", "stopped"}
    # Lost with its host: its silence charges the requests it held no crash.
    assert {cause for cause, _ in causes(cluster.db, lost_workers)} == {"host_silent"}
    assert held and charged_crashes(cluster.db, batch.id) == {}
    assert re.search(r"rescued \d+ requests of dead workers", cluster.log(cluster.c, "watchdog.log")
                     + cluster.log(cluster.c, "worker-echo-0.log"))
    cluster.start_worker_host(cluster.b)  # the host comes back
    wait_for(lambda: live_workers(cluster.db, "host-b"), 120, interval=0.5, message="host-b's worker back")


def test_a_worker_frozen_on_a_live_host_charges_a_crash_to_what_it_held(cluster):
    batch = running_batch(cluster, cluster.client, 1200, cluster.b)
    [frozen] = live_workers(cluster.db, "host-b")
    os.kill(frozen.pid, signal.SIGSTOP)  # its host's watchdog beats on: the hang is judged there
    held = held_by(cluster.db, batch.id, "host-b")
    done = wait_for_batch(cluster.client, batch.id, 180)
    assert done.status == "completed" and done.request_counts.completed == 1200
    assert_each_once(cluster.client, done, 1200)
    assert causes(cluster.db, [frozen.id]) == {("hung", "host-b")}
    # Charged once each (never twice): what it held, and what a claim of its that was open when it
    # froze took, committed when SIGCONT woke it to be killed (no snapshot of held rows sees that).
    charged = charged_crashes(cluster.db, batch.id)
    assert held and set(held) <= set(charged) and set(charged.values()) == {1}
    with cluster.db.connect() as conn:
        handed_back = conn.execute(sa.text("SELECT requests FROM worker_deaths WHERE worker_id = :w"),
                                   {"w": frozen.id}).scalar()
    assert len(charged) == handed_back
    wait_for(lambda: live_workers(cluster.db, "host-b"), 60, interval=0.5, message="host-b's worker again")


def test_a_host_cut_off_is_fenced_and_charged_no_restart(cluster):
    charged = restarts(cluster.db, "host-c")
    batch = running_batch(cluster, cluster.client, 1200, cluster.c)
    fenced = {str(row.id) for row in live_workers(cluster.db, "host-c")}
    cluster.net.cut("host-c")
    held = held_by(cluster.db, batch.id, "host-c")
    try:
        # B's watchdog and worker declare C's worker dead once its heartbeat is HEARTBEAT_TIMEOUT old.
        wait_for(lambda: not (fenced & {str(row.id) for row in live_workers(cluster.db, "host-c")}),
                 HEARTBEAT_TIMEOUT + 30, interval=0.3, message="host-c's worker declared dead")
        time.sleep(2)  # B takes over what C held, while C still holds its copies
    finally:
        cluster.net.mend("host-c")
    done = wait_for_batch(cluster.client, batch.id, 180)
    assert done.status == "completed" and done.request_counts.completed == 1200
    assert_each_once(cluster.client, done, 1200)
    stored = stored_by(cluster.db, batch.id)
    assert all(len(hosts) == 1 for hosts in stored.values())
    assert all(stored[custom_id] == {"host-b"} for custom_id in held)  # what C held, B ran
    with cluster.db.connect() as conn:  # none of what the fenced worker held was stored by it
        late = conn.execute(sa.text("SELECT count(*) FROM batch_requests WHERE batch_id = :b "
                                    "AND CAST(worker_id AS text) = ANY(:ids)"), {"b": batch.id, "ids": list(fenced)})
        assert late.scalar() == 0
    assert held and charged_crashes(cluster.db, batch.id) == {}  # cut off: no crash, for what it held or anything
    assert {cause for cause, _ in causes(cluster.db, fenced)} == {"host_silent"}
    # C's worker notices it was fenced and a new one registers and works; nothing is charged.
    wait_for(lambda: live_workers(cluster.db, "host-c"), 60, interval=0.5, message="host-c's worker again")
    log = cluster.log(cluster.c, "watchdog.log")
    assert re.search(r"echo-0 was declared dead elsewhere and stopped; starting it again \(not counted as a restart\)",
                     log), log[-3000:]
    assert restarts(cluster.db, "host-c") == charged
    again = wait_for_batch(cluster.client, submit(cluster.client, lines(400)).id, 120)
    assert again.status == "completed"
    assert "host-c" in set().union(*stored_by(cluster.db, again.id).values())


def test_through_pgbouncer_in_transaction_mode_every_protocol_holds(cluster):
    logs = ("watchdog.log", "worker-echo-0.log")
    before = log_sizes(cluster, logs)  # what the outages of the tests above logged is not this test's
    for host in (cluster.b, cluster.c):
        cluster.stop_worker_host(host)
        cluster.start_worker_host(host, pooled=True)
    for host in (cluster.b, cluster.c):
        wait_for(lambda: live_workers(cluster.db, host.name), 120, interval=0.5, message=f"{host.name}'s worker")
    client = cluster.start_api(POOLED_API_PORT, DATABASE_URL=postgres_url("127.0.0.1", PGBOUNCER_PORT),
                               DATABASE_TRANSACTION_POOLING="true", MIGRATION_DATABASE_URL=postgres_url("127.0.0.1"))
    batch = submit(client, lines(600))
    held: dict = {}
    holder = threading.Thread(target=lambda: held.update(
        batch=client.batches.retrieve(batch.id, extra_query={"wait": 60}), at=time.time()))
    holder.start()
    done = wait_for_batch(client, batch.id, 120)
    holder.join(70)
    assert done.status == "completed" and done.request_counts.completed == 600
    assert_each_once(client, done, 600)
    assert set().union(*stored_by(cluster.db, done.id).values()) == {"host-b", "host-c"}
    # The held retrieve answers the end: with no LISTEN through the pooler, at its next re-read.
    assert held["batch"].status == "completed" and held["at"] - done.completed_at < 8
    cancelled = submit(client, lines(1200))
    wait_for(lambda: client.batches.retrieve(cancelled.id).request_counts.completed > 50, 60, message="running")
    client.batches.cancel(cancelled.id)
    ended = wait_for_batch(client, cancelled.id, 60)
    assert ended.status == "cancelled"
    assert_each_once(client, ended, 1200)
    assert 50 < ended.request_counts.completed < 1200
    for host in (cluster.b, cluster.c):
        for name in logs:
            errors = [line for line in cluster.log(host, name, before[host.name, name]).splitlines()
                      if " ERROR " in line or "prepared statement" in line]
            assert not errors, (host.name, name, errors[:3])
    api_log = (cluster.root / "a" / "logs" / f"api-{POOLED_API_PORT}.log").read_text(errors="replace")
    assert " ERROR " not in api_log and "prepared statement" not in api_log
