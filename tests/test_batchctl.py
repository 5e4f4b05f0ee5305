"""`batchctl` through its installed entry point against a running stack: a real API server, a real
watchdog and its worker processes (running the test echo engine), the real database."""

from __future__ import annotations

import json
import os
import shutil
import signal

import openai
import pytest
from alembic.script import ScriptDirectory

from core.batch_app.database import alembic_config

from .conftest import API_KEY, batchctl, echo_slot, gone, live_worker, start_watchdog, wait_for
from .jsonl import jsonl, request_line, submit


@pytest.fixture(scope="module")
def echo_stack(database, data_dir, db, api):
    """A watchdog with one echo worker, and the environment batchctl needs to reach it all."""
    slot = "ctl-echo"
    watchdog = start_watchdog(database, data_dir, "watchdog-batchctl", [echo_slot(slot)], HEARTBEAT_INTERVAL="0.5",
                              RESTART_BACKOFF_MIN="0.2", SHUTDOWN_GRACE="5", KILL_GRACE="1")
    try:
        wait_for(lambda: live_worker(db, slot), 60, message="echo worker up")
        env = dict(watchdog.env, BATCHCTL_API_URL=f"{api.base_url}/v1", BATCHCTL_API_KEY=API_KEY,
                   API_PORT=str(api.port))
        yield slot, env, watchdog
    finally:
        watchdog.stop()


def test_submit_wait_shows_progress_and_downloads_the_results(echo_stack, tmp_path):
    slot, env, _ = echo_stack
    source = tmp_path / "requests.jsonl"
    source.write_bytes(jsonl([request_line(f"r{i}", slot) for i in range(30)]))
    result = batchctl(env, "submit", str(source), "--wait", "--poll", "0.3", "--output-dir", str(tmp_path / "out"),
                      "--metadata", "team=tests")
    assert result.returncode == 0, result.stderr
    assert "created batch batch_" in result.stdout
    assert "30 ok / 0 failed / 30 total" in result.stdout and "tok/s" in result.stdout and "ETA" in result.stdout
    [output] = (tmp_path / "out").glob("batch_*_output.jsonl")
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(a["custom_id"] for a in answers) == sorted(f"r{i}" for i in range(30))
    assert answers[0]["response"]["status_code"] == 200


def test_status_list_cancel_and_download(echo_stack, client, live_model, tmp_path):
    _, env, _ = echo_stack
    batch = submit(client, [request_line(f"q{i}", live_model) for i in range(3)])  # nobody serves it: it waits

    status = batchctl(env, "status", batch.id)
    assert status.returncode == 0 and batch.id in status.stdout and "0 completed, 0 failed, 3 total" in status.stdout
    assert batch.id in batchctl(env, "status").stdout  # the latest batch by default
    listed = batchctl(env, "list", "--limit", "100")
    assert listed.returncode == 0 and batch.id in listed.stdout

    cancelled = batchctl(env, "cancel", batch.id)
    assert cancelled.returncode == 0 and f"batch {batch.id}: cancelled" in cancelled.stdout
    downloaded = batchctl(env, "download", batch.id, "--output-dir", str(tmp_path))
    assert downloaded.returncode == 0, downloaded.stderr
    errors = (tmp_path / f"{batch.id}_errors.jsonl").read_text().splitlines()
    assert len(errors) == 3


@pytest.mark.parametrize("args, overrides, expected", [
    (["list"], {"BATCHCTL_API_KEY": "sk-wrong"}, "the API refused the key: Incorrect API key provided."),
    (["status", "batch_nope"], {}, "the API answered 404: No batch found with id 'batch_nope'."),
    (["list"], {"BATCHCTL_API_URL": "http://127.0.0.1:9/v1"}, "cannot reach the API at http://127.0.0.1:9/v1"),
    (["submit", "/nonexistent.jsonl"], {}, "no such file: /nonexistent.jsonl"),
    (["worker", "reset", "no-such-worker"], {}, "no worker named 'no-such-worker'"),
    (["workers"], {"DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"}, "cannot reach the database"),
])
def test_every_failure_is_one_clear_line(echo_stack, args, overrides, expected):
    _, env, _ = echo_stack
    result = batchctl({**env, **overrides}, *args)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("batchctl: ") and expected in result.stderr, result.stderr


def test_workers_table_and_a_created_key_that_works(echo_stack, api, db):
    slot, env, _ = echo_stack
    table = batchctl(env, "workers")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if slot in line)
    assert "idle" in row or "busy" in row
    assert "ago" in row and str(live_worker(db, slot).pid) in row

    created = batchctl(env, "keys", "create", "--project", "ctl-project", "--name", "ci")
    key = created.stdout.strip()
    assert created.returncode == 0 and key.startswith("sk-batch-")
    assert api.client(key).batches.list().data == []  # a project of its own, nothing in it yet


def test_diagnose_names_a_killed_worker_and_why(echo_stack, db, api, database):
    slot, env, _ = echo_stack
    killed = live_worker(db, slot)
    os.kill(killed.pid, signal.SIGKILL)
    wait_for(lambda: (w := live_worker(db, slot)) and w.pid != killed.pid, 60, message="replacement worker")

    report = batchctl(env, "diagnose")
    assert report.returncode == 0, report.stderr
    text = report.stdout
    for section in ("== Ports", "== API", "== Database", "== Workers", "== Restarts", "== Worker logs", "== GPU",
                    "== Disk", "== Problems"):
        assert section in text
    assert f"API_PORT {api.port}: listening" in text and "core.batch_app.api_server" in text
    assert '"status":"healthy"' in text
    head = ScriptDirectory.from_config(alembic_config(database)).get_current_head()
    assert "reachable, PostgreSQL" in text and f"migration: database at {head}, code at head {head}\n" in text
    gpus = text.split("== GPU")[1].split("== Disk")[0].strip()
    assert gpus and ("nvidia-smi not found" in gpus) == (shutil.which("nvidia-smi") is None)
    assert "GiB free" in text
    problems = text.split("== Problems")[1]
    assert f"worker {slot} was restarted" in problems and "killed by SIGKILL" in problems
    assert f"worker-{slot}.log" in text


def test_diagnose_names_a_dead_worker_that_nobody_restarts(database, data_dir, db, api):
    """It kills a watchdog of its own, then that watchdog's orphaned worker."""
    slot = "ctl-orphan"
    watchdog = start_watchdog(database, data_dir, "watchdog-orphan", [echo_slot(slot)], HEARTBEAT_INTERVAL="0.5")
    env = dict(watchdog.env, BATCHCTL_API_URL=f"{api.base_url}/v1", BATCHCTL_API_KEY=API_KEY, API_PORT=str(api.port))
    try:
        orphan = wait_for(lambda: live_worker(db, slot), 60, message="echo worker up")
        watchdog.process.send_signal(signal.SIGKILL)
        watchdog.process.wait(10)
        os.kill(orphan.pid, signal.SIGKILL)
        wait_for(lambda: gone(orphan.pid), 10, message="worker gone")
        problems = batchctl(env, "diagnose").stdout.split("== Problems")[1]
    finally:
        watchdog.stop()
    # An orphan is reaped by PID 1, which in some containers never reaps: a zombie is named as such.
    assert (f"worker {slot} (pid {orphan.pid}): its process is gone but it is recorded as {orphan.status}: "
            f"it was killed or crashed" in problems) or f"worker {slot} (pid {orphan.pid}): process is zombie" in problems


def test_keys_are_listed_without_their_secret_and_a_revoked_key_is_refused(echo_stack, api):
    _, env, _ = echo_stack
    key = batchctl(env, "keys", "create", "--project", "revoked-project", "--name", "leaked").stdout.strip()
    assert api.client(key).batches.list().data == []
    listing = batchctl(env, "keys", "list")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if "leaked" in line)
    assert "revoked-project" in row and key not in listing.stdout
    key_id = row.split("│")[1].strip()
    revoked = batchctl(env, "keys", "revoke", key_id)
    assert revoked.returncode == 0 and f"key {key_id} revoked" in revoked.stdout, revoked.stderr
    with pytest.raises(openai.AuthenticationError):
        api.client(key).batches.list()
    again = batchctl(env, "keys", "revoke", key_id)
    assert again.returncode == 1 and f"no API key with id {key_id}" in again.stderr
