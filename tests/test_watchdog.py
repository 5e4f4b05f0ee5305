"""The watchdog with real processes: detection of crashes, hangs and stalls, whole-tree kills,
rescue, capped restarts counted in the database, Sentry alerts, and its own clean shutdown.

Workers here run the test engines of tests/engines.py, which stand in for vLLM where a
behaviour must be produced on demand (an engine that hangs, an input that kills its worker);
the same checks against the real vLLM engine are in test_end_to_end.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time

import openai
import pytest
import sqlalchemy as sa

from .conftest import (
    batchctl,
    echo_slot,
    gone,
    live_worker,
    rerun,
    restarts,
    running_watchdog,
    start_watchdog,
    wait_for,
    wait_for_batch,
)
from .jsonl import request_line, submit
from .sentry_receiver import SentryReceiver

FAST_LIVENESS = dict(HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TIMEOUT="3", STALL_TIMEOUT="3",
                     RESTART_BACKOFF_MIN="0.5", SHUTDOWN_GRACE="5", KILL_GRACE="1")


@pytest.fixture
def sentry():
    receiver = SentryReceiver()
    yield receiver
    receiver.close()


def assert_each_custom_id_once(client, batch, expected: set[str]) -> None:
    seen = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            seen += [json.loads(line)["custom_id"] for line in client.files.content(file_id).text.splitlines()]
    assert len(seen) == len(set(seen)) and set(seen) == expected


def test_sigkill_is_detected_fast_and_the_batch_completes(database, data_dir, db, client, sentry):
    slot = "kill-0"
    with running_watchdog(database, data_dir, "watchdog-kill", [echo_slot(slot)], SENTRY_DSN=sentry.dsn,
                          ECHO_STEP_SECONDS="0.02", **FAST_LIVENESS):
        first = wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        batch = submit(client, [request_line(f"r{i}", slot) for i in range(400)])
        wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed > 50, 60, message="progress")
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: restarts(db, slot), 10, interval=0.05, message="restart recorded")
        print(f"\ncrash detection latency: {time.monotonic() - killed_at:.2f} s")
        assert restarts(db, slot)[0].exit_code == -signal.SIGKILL
        # Seen by its exit (the cause read from the signal), not by its silence (that would be
        # `hung`, after HEARTBEAT_TIMEOUT): the next check after the kill found it.
        with db.connect() as conn:
            cause = conn.execute(sa.text("SELECT cause FROM worker_deaths WHERE worker_id = :w"),
                                 {"w": first.id}).scalar()
        assert cause == "killed"
        done = wait_for_batch(client, batch.id, 120)
        assert done.status == "completed" and done.request_counts.completed == 400
        assert_each_custom_id_once(client, done, {f"r{i}" for i in range(400)})
        # The victim held requests, and they ran again (once: above), charged no crash: a SIGKILL
        # from outside with no OOM kill is not their doing. The restart is charged.
        assert rerun(db, batch.id) and set(rerun(db, batch.id).values()) == {0}
        assert live_worker(db, slot).pid != first.pid
        warning = wait_for(lambda: sentry.messages("warning"), 10, message="warning event")[0]
        assert warning["tags"]["slot"] == slot and warning["tags"]["worker_id"] == str(first.id)
        assert "SIGKILL" in warning["message"] or "SIGKILL" in str(warning.get("logentry"))
        assert warning["extra"]["last_log_lines"]


def test_a_death_is_charged_to_the_requests_only_when_they_may_have_caused_it(monkeypatch):
    from core.batch_app.domain.queue import CHARGED_DEATHS
    from core.batch_app.domain.statuses import DeathCause
    from core.batch_app.shutdown import FENCED_EXIT_CODE
    from core.batch_app.watchdog import process_control
    from core.batch_app.watchdog.process_control import death_cause

    monkeypatch.setattr(process_control, "oom_kills", lambda: 7)
    causes = {code: death_cause(code, 7) for code in (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGSEGV,
                                                      -signal.SIGABRT, 1, 139, 0, FENCED_EXIT_CODE)}
    assert causes == {-signal.SIGKILL: DeathCause.KILLED, -signal.SIGTERM: DeathCause.KILLED,  # from outside
                      -signal.SIGSEGV: DeathCause.CRASH_SIGNAL, -signal.SIGABRT: DeathCause.CRASH_SIGNAL,
                      1: DeathCause.EXITED, 139: DeathCause.EXITED,  # an exception, or an engine's own exit
                      0: DeathCause.DRAINED, FENCED_EXIT_CODE: DeathCause.FENCED}
    assert death_cause(-signal.SIGKILL, 6) == DeathCause.OOM_KILLED  # the OOM killer struck meanwhile
    assert death_cause(-signal.SIGKILL, None) == DeathCause.OOM_KILLED  # unknown: charged
    monkeypatch.setattr(process_control, "oom_kills", lambda: None)
    assert death_cause(-signal.SIGKILL, 7) == DeathCause.OOM_KILLED
    assert {cause for cause in DeathCause if cause in CHARGED_DEATHS} == {
        DeathCause.EXITED, DeathCause.CRASH_SIGNAL, DeathCause.OOM_KILLED, DeathCause.HUNG, DeathCause.STALLED,
        DeathCause.FAILED_TO_START}


def test_stopped_process_is_detected_as_hung_by_its_heartbeat(database, data_dir, db, client):
    slot = "stop-0"
    with running_watchdog(database, data_dir, "watchdog-stop", [echo_slot(slot)], ECHO_STEP_SECONDS="0.2",
                          **FAST_LIVENESS):
        first = wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        batch = submit(client, [request_line(f"r{i}", slot) for i in range(100)])
        wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed > 0, 60, message="progress")
        os.kill(first.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        [restart] = wait_for(lambda: restarts(db, slot), 20, interval=0.1, message="hang detected")
        print(f"\nhang detection latency: {time.monotonic() - stopped_at:.2f} s (heartbeat timeout 3 s)")
        assert "no heartbeat" in restart.reason and "stopped" in restart.reason
        assert gone(first.pid)
        done = wait_for_batch(client, batch.id, 120)
        assert done.status == "completed"
        assert_each_custom_id_once(client, done, {f"r{i}" for i in range(100)})
        assert set(rerun(db, batch.id).values()) == {1}  # what the hung worker held ran again, charged


def test_engine_hang_behind_a_live_heartbeat_is_caught_by_the_progress_check(database, data_dir, db, client):
    slot = "stall-0"
    with running_watchdog(database, data_dir, "watchdog-stall", [echo_slot(slot, "HangingEngine")],
                          **FAST_LIVENESS):
        wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        batch = submit(client, [request_line("r0", slot)])
        hung_at = time.monotonic()
        [restart] = wait_for(lambda: restarts(db, slot)[:1], 30, interval=0.1, message="stall detected")
        print(f"\nstall detection latency: {time.monotonic() - hung_at:.2f} s (stall timeout 3 s)")
        assert "stalled" in restart.reason
        client.batches.cancel(batch.id)


@pytest.mark.vllm
def test_failing_start_is_restarted_up_to_the_cap_then_alerts_once(database, data_dir, db, sentry):
    slot = "broken-0"
    bad = {"slot": slot, "model": "/nonexistent/model", "engine": "vllm"}  # the vLLM engine, a path with nothing there
    with running_watchdog(database, data_dir, "watchdog-cap", [bad], SENTRY_DSN=sentry.dsn,
                          MAX_RESTARTS_PER_HOUR="2", RESTART_BACKOFF_MIN="0.2", RESTART_BACKOFF_MAX="0.5"):
        wait_for(lambda: sentry.messages("error"), 300, message="error event")
        time.sleep(2)  # nothing more happens once the cap is reached
        assert len(restarts(db, slot)) == 2
        assert len(sentry.messages("error")) == 1
        assert len(sentry.messages("warning")) == 2
        assert "reached 2 restarts" in sentry.messages("error")[0]["message"]
        assert sentry.log_items == 0
        log = (data_dir / "logs" / "watchdog-cap" / f"worker-{slot}.log").read_text()
        assert "model load failed: FileNotFoundError: model /nonexistent/model: no such file or directory" in log

    # A new watchdog keeps the count: the slot stays stopped until an operator resets it.
    with running_watchdog(database, data_dir, "watchdog-cap-2", [bad], MAX_RESTARTS_PER_HOUR="2",
                          RESTART_BACKOFF_MIN="0.2", RESTART_BACKOFF_MAX="0.5") as again:
        time.sleep(4)
        assert len(restarts(db, slot)) == 2
        assert "started worker" not in (again.log_dir / "watchdog.log").read_text()
        reset = batchctl(again.env, "worker", "reset", slot)
        assert reset.returncode == 0 and f"worker {slot}" in reset.stdout, reset.stderr
        wait_for(lambda: "started worker broken-0" in (again.log_dir / "watchdog.log").read_text(), 30,
                 message="the slot started again after the reset")


def test_poison_request_fails_alone_and_the_rest_completes(database, data_dir, db, client):
    slot = "poison-0"
    with running_watchdog(database, data_dir, "watchdog-poison", [echo_slot(slot, "PoisonEngine")],
                          MAX_ATTEMPTS="2", **FAST_LIVENESS):
        wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        lines = [request_line(f"r{i}", slot) for i in range(20)]
        lines[5] = request_line("bad", slot, messages=[{"role": "user", "content": "poison"}])
        batch = submit(client, lines)
        done = wait_for_batch(client, batch.id, 120)
        assert done.status == "completed"
        assert (done.request_counts.completed, done.request_counts.failed) == (19, 1)
        [error] = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
        assert error["custom_id"] == "bad" and error["error"]["code"] == "poison_request"
        assert len(restarts(db, slot)) == 2


def test_sigterm_drains_and_leaves_no_process_and_a_new_watchdog_cleans_leftovers(database, data_dir, db):
    slot = "term-0"
    watchdog = start_watchdog(database, data_dir, "watchdog-term", [echo_slot(slot)], **FAST_LIVENESS)
    worker = wait_for(lambda: live_worker(db, slot), 60, message="worker up")
    tree = [watchdog.process.pid, worker.pid]
    assert watchdog.stop() == 0
    assert all(gone(pid) for pid in tree)
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM workers WHERE id = :id"), {"id": worker.id}).scalar() == "stopped"

    # A watchdog killed outright leaves its worker running; the next one cleans it up.
    crashed = start_watchdog(database, data_dir, "watchdog-crashed", [echo_slot(slot)], **FAST_LIVENESS)
    orphan = wait_for(lambda: live_worker(db, slot), 60, message="worker up")
    crashed.process.kill()
    crashed.process.wait()
    assert not gone(orphan.pid)
    with running_watchdog(database, data_dir, "watchdog-successor", [echo_slot(slot)], **FAST_LIVENESS):
        wait_for(lambda: gone(orphan.pid), 30, message="orphan killed")
        replacement = wait_for(lambda: live_worker(db, slot), 60, message="replacement up")
        assert replacement.pid != orphan.pid


def test_a_load_the_stop_signal_breaks_is_a_stop_not_a_charged_failure(database, data_dir, db):
    slot = "broken-load-0"
    with running_watchdog(database, data_dir, "watchdog-broken-load", [echo_slot(slot, "SignalBreaksLoadEngine")],
                          **FAST_LIVENESS) as watchdog:
        loading = wait_for(lambda: live_worker(db, slot, statuses=("loading",)), 60, message="loading")
        log_path = watchdog.log_dir / f"worker-{slot}.log"
        wait_for(lambda: "slow load begins" in log_path.read_text(), 30, interval=0.1, message="the load begun")
        os.kill(loading.pid, signal.SIGTERM)
        wait_for(lambda: gone(loading.pid), 15, message="stopped")
        with db.connect() as conn:
            assert conn.execute(sa.text("SELECT status FROM workers WHERE id = :id"),
                                {"id": loading.id}).scalar() == "stopped"
        log = log_path.read_text()
        assert "the load ended by the stop signal failed with RecursionError" in log
        assert "model load failed" not in log
        assert restarts(db, slot) == []


def test_a_slot_at_its_cap_stays_stopped_across_watchdog_restarts(database, data_dir, db):
    slot = "capped-0"
    with db.begin() as conn:
        for _ in range(2):
            conn.execute(sa.text("INSERT INTO worker_restarts (slot, host, reason) VALUES (:s, :h, 'crashed')"),
                         {"s": slot, "h": socket.gethostname()})
    for round_ in range(3):
        with running_watchdog(database, data_dir, f"watchdog-capped-{round_}", [echo_slot(slot)],
                              MAX_RESTARTS_PER_HOUR="2", **FAST_LIVENESS) as watchdog:
            wait_for(lambda: "stays stopped" in (watchdog.log_dir / "watchdog.log").read_text(), 30,
                     message="the watchdog reading the cap")
            time.sleep(2)  # several rounds of checks: nothing starts
        with db.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM workers WHERE slot = :s"), {"s": slot}).scalar() == 0
    reset = batchctl(watchdog.env, "worker", "reset", slot)  # the one way out
    assert reset.returncode == 0, reset.stderr
    with running_watchdog(database, data_dir, "watchdog-capped-reset", [echo_slot(slot)], MAX_RESTARTS_PER_HOUR="2",
                          **FAST_LIVENESS):
        wait_for(lambda: live_worker(db, slot), 60, message="the reset slot started")


def test_a_writer_failing_at_finalizing_retries_and_the_batch_completes(database, data_dir, db, client):
    slot = "full-disk-0"
    # The default liveness: a heartbeat late on a busy machine must not pass for the restart this
    # test says never happens.
    with running_watchdog(database, data_dir, "watchdog-full-disk", [echo_slot(slot, "FullDiskEngine")],
                          FAIL_FINALIZING="2") as watchdog:
        worker = wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        batch = submit(client, [request_line(f"r{i}", slot) for i in range(20)])
        done = wait_for_batch(client, batch.id, 60)
        assert done.status == "completed" and done.request_counts.completed == 20
        assert_each_custom_id_once(client, done, {f"r{i}" for i in range(20)})
        log = (watchdog.log_dir / f"worker-{slot}.log").read_text()
        assert log.count("OSError: [Errno 28] No space left on device") >= 2 and "retrying in" in log
        assert live_worker(db, slot).pid == worker.pid and restarts(db, slot) == []  # recovered in place


def deadlocks(db) -> int:
    """The deadlocks PostgreSQL has detected in the test database (its own count, wherever its log is)."""
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
                            ).scalar()


def cancel_unless_ending(client, batch_id: str) -> None:
    """A cancel racing the batch's end may find it finalizing already, and is refused with a 409."""
    with contextlib.suppress(openai.ConflictError):
        client.batches.cancel(batch_id)


def test_cancel_and_expiry_while_workers_claim_never_deadlock(database, data_dir, db, client, api):
    model = "race"
    before, api_log_start = deadlocks(db), api.log_path.stat().st_size
    slots = [{"slot": f"race-{i}", "model": f"/models/{model}", "served_name": model,
              "engine": "tests.engines:EchoEngine"} for i in range(2)]
    with running_watchdog(database, data_dir, "watchdog-race", slots, ECHO_STEP_SECONDS="0.01",
                          HOUSEKEEPING_INTERVAL="0.2", **FAST_LIVENESS) as watchdog:
        for entry in slots:
            wait_for(lambda: live_worker(db, entry["slot"]), 60, message="workers up")
        batches = []
        for _ in range(30):  # each batch is cancelled, or expires, while the workers claim from it
            cancelled = submit(client, [request_line(f"c{i}", model) for i in range(40)])
            expiring = submit(client, [request_line(f"e{i}", model) for i in range(400)], completion_window="1s")
            threading.Thread(target=cancel_unless_ending, args=(client, cancelled.id)).start()
            batches += [cancelled, expiring]
        ended = [wait_for_batch(client, batch.id, 120) for batch in batches]
        assert {batch.status for batch in ended} <= {"cancelled", "expired", "completed"}
        assert any(batch.status == "expired" for batch in ended) and any(b.status == "cancelled" for b in ended)
    # The workers have exited, so their connections' counts have reached PostgreSQL's statistics.
    assert deadlocks(db) == before
    with open(api.log_path, "rb") as api_log:  # this test's part of the shared API's log
        api_log.seek(api_log_start)
        assert b"deadlock" not in api_log.read().lower()
    assert not [path for path in watchdog.log_dir.glob("*.log") if "deadlock" in path.read_text(errors="replace").lower()]
