"""A server slot's health check decides its fate: a real watchdog runs server slots whose vLLM is
the stand-in of tests/fake_vllm (no model is loaded), probes them over real HTTP, and restarts one
that never passes a check within STARTUP_TIMEOUT (failed_to_start) and one whose checks stop
being answered while it runs (hung, here a server stopped with SIGSTOP). Each restart is named in
the watchdog's log, recorded with its reason and counted in `batchctl workers`."""

from __future__ import annotations

import re
import signal

import sqlalchemy as sa

from core.batch_app.watchdog.process_control import group_members

from .conftest import REPO, batchctl, free_port, gone, running_watchdog, wait_for
from .fake_vllm import fake_model, fake_stack, server_slot

SERVED = "probed-llama"
# Servers are probed every second; a check that is not answered takes the probe's own 10 s.
FAST = {"HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TIMEOUT": "5", "RESTART_BACKOFF_MIN": "0.5",
        "RESTART_BACKOFF_MAX": "1", "SHUTDOWN_GRACE": "5"}


def current_row(db, slot: str):
    """The newest process row of a slot (id, pid, status, probe)."""
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT id, pid, status, probe FROM workers WHERE slot = :slot "
                                    "ORDER BY started_at DESC LIMIT 1"), {"slot": slot}).first()


def death(db, worker_id: str):
    """(cause, detail) of a process row declared dead, else None."""
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT cause, detail FROM worker_deaths WHERE worker_id = :id"),
                            {"id": worker_id}).first()


def restarts(db, slot: str) -> list[str]:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT reason FROM worker_restarts WHERE slot = :slot AND reason <> 'reset' "
                                    "ORDER BY restarted_at"), {"slot": slot}).scalars().all()


def watchdog_lines(watchdog, *needles: str) -> list[str]:
    text = (watchdog.log_dir / "watchdog.log").read_text(errors="replace")
    return [line for line in text.splitlines() if all(needle in line for needle in needles)]


def workers_row(watchdog, slot: str) -> list[str]:
    """The cells of the slot's row in `batchctl workers`, as an operator reads them."""
    listed = batchctl(watchdog.env, "workers")
    assert listed.returncode == 0, listed.stderr
    row = next((line for line in listed.stdout.splitlines() if re.match(rf"\W*{re.escape(slot)}\s", line)), None)
    assert row is not None, listed.stdout
    return [cell.strip() for cell in re.split(r"[│|]", row) if cell.strip()]


def test_a_server_that_passes_no_health_check_within_the_start_up_timeout_is_killed_and_restarted(
        database, data_dir, db, tmp_path):
    slot, port = "never-healthy-0", free_port()
    slots = [server_slot(slot, port, fake_model(tmp_path / "model"), SERVED, health="never")]
    # A cap of one restart an hour: the second start is the last, and the count stays exact.
    with running_watchdog(database, data_dir, "watchdog-never-healthy", slots, STARTUP_TIMEOUT="6",
                          MAX_RESTARTS_PER_HOUR="1", **FAST, **fake_stack(tmp_path / "records", REPO)) as watchdog:
        first = wait_for(lambda: current_row(db, slot), 30, message="the server's row")
        # Loading (no check passed yet) is not a failure until STARTUP_TIMEOUT.
        assert first.status == "loading"
        [recorded] = wait_for(lambda: restarts(db, slot), 60, message="the restart recorded")
        assert re.fullmatch(r"did not pass a health check within the start-up timeout of 6 s "
                            r"\(GET /health: ConnectError: .+\)", recorded), recorded
        assert death(db, first.id) == ("failed_to_start", recorded)
        [said] = wait_for(lambda: watchdog_lines(watchdog, f"server {slot} (pid {first.pid})", "killing its process group"),
                          30, message="the watchdog's log line")
        assert "did not pass a health check within the start-up timeout of 6 s" in said and " WARNING " in said
        wait_for(lambda: gone(first.pid) and not group_members(first.pid), 30, message="the old server gone")
        # Started again, under a new row and process: and counted against the restart cap.
        second = wait_for(lambda: (row := current_row(db, slot)) and row.id != first.id and row, 30,
                          message="the server started again")
        assert second.pid != first.pid
        assert watchdog_lines(watchdog, f"started server {slot} (pid {second.pid})")
        cells = workers_row(watchdog, slot)
        assert cells[1] == "server" and cells[5] == "1", cells  # restarts (1 h)


def test_a_server_whose_health_check_stops_answering_is_restarted_as_hung(database, data_dir, db, tmp_path):
    slot, port = "stops-answering-0", free_port()
    slots = [server_slot(slot, port, fake_model(tmp_path / "model"), SERVED)]
    with running_watchdog(database, data_dir, "watchdog-stops-answering", slots, STARTUP_TIMEOUT="60",
                          **FAST, **fake_stack(tmp_path / "records", REPO)) as watchdog:
        healthy = wait_for(lambda: (row := current_row(db, slot)) and row.status == "idle" and row, 60,
                           message="the server's first passed check")
        assert healthy.probe.startswith("healthy (")
        assert restarts(db, slot) == []
        for member in group_members(healthy.pid):
            member.send_signal(signal.SIGSTOP)  # it still accepts connections, and answers none
        [recorded] = wait_for(lambda: restarts(db, slot), 60, message="the restart recorded")
        assert re.fullmatch(r"health check failing for \d+ s \(GET /health: no answer within 10 s\)", recorded), \
            recorded
        assert death(db, healthy.id) == ("hung", recorded)
        [said] = wait_for(lambda: watchdog_lines(watchdog, f"server {slot} (pid {healthy.pid})", "killing its process group"),
                          30, message="the watchdog's log line")
        assert recorded in said and " WARNING " in said
        wait_for(lambda: gone(healthy.pid) and not group_members(healthy.pid), 30, message="the stopped server gone")
        again = wait_for(lambda: (row := current_row(db, slot)) and row.id != healthy.id and row.status == "idle"
                         and row, 60, message="the new server passing its checks")
        assert again.pid != healthy.pid and again.probe.startswith("healthy (")
        cells = workers_row(watchdog, slot)
        assert cells[1:3] == ["server", "idle"] and cells[5] == "1", cells
        assert "healthy (" in cells[4], cells
