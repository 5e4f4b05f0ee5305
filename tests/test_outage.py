"""A database outage ends no process: the embedded PostgreSQL of the test session is stopped with
the project's own command mid-batch, for far longer than the heartbeat timeout, and started again.

Workers run the echo test engine (a real worker process, a stand-in for vLLM's generation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import sqlalchemy as sa

from .conftest import (
    API_KEY,
    REPO,
    batchctl,
    cannot_run,
    database_of_the_module,
    live_worker,
    running_watchdog,
    wait_for,
    wait_for_batch,
)
from .jsonl import jsonl, request_line, submit, upload

MODEL = "outage-echo"
SLOTS = [{"slot": f"outage-{i}", "model": f"/models/{MODEL}", "served_name": MODEL,
          "engine": "tests.engines:EchoEngine"} for i in range(2)]
OUTAGE_SECONDS = 15
database, db, api = database_of_the_module("outage")  # its retention deletes every batch finished 600 s ago


def database_command(data_dir, action: str) -> None:
    """`python -m core.batch_app.database stop|start` on the session's embedded server."""
    env = {**os.environ, "DATA_DIR": str(data_dir), "DATABASE_URL": "", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "core.batch_app.database", action], env=env, cwd=REPO, check=True,
                   capture_output=True, timeout=120)


@pytest.fixture
def embedded_database(data_dir):
    if os.environ.get("TEST_DATABASE_URL"):
        cannot_run("TEST_DATABASE_URL names a server this test cannot stop and start")
    yield data_dir
    database_command(data_dir, "start")  # whatever happened, the rest of the session has its database


def test_a_database_outage_ends_no_process_charges_nothing_and_loses_nothing(
        embedded_database, database, data_dir, db, api, client):
    with running_watchdog(database, data_dir, "watchdog-outage", SLOTS, HEARTBEAT_INTERVAL="0.5",
                          HEARTBEAT_TIMEOUT="3", STALL_TIMEOUT="3", ECHO_STEP_SECONDS="0.1",
                          HOUSEKEEPING_INTERVAL="1", FINISHED_REQUESTS_RETENTION="600", RETENTION_INTERVAL="0.2",
                          RETENTION_BATCH_ROWS="1") as watchdog:
        workers = [wait_for(lambda: live_worker(db, slot["slot"]), 60, message="worker up") for slot in SLOTS]
        earlier = wait_for_batch(client, submit(client, [request_line(f"e{i}", MODEL) for i in range(300)]).id, 60)
        batch = submit(client, [request_line(f"r{i}", MODEL) for i in range(1500)])
        later = upload(client, jsonl([request_line("later", MODEL)]))
        wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed > 300, 60, message="progress")

        # The earlier batch's rows are due for deletion (a row a transaction): the outage cuts it short.
        with db.begin() as conn:
            conn.execute(sa.text("UPDATE batches SET completed_at = now() - interval '1 hour' WHERE id = :b"),
                         {"b": earlier.id})
        wait_for(lambda: _rows(db, earlier.id) < 300, 30, interval=0.05, message="retention deleting rows")
        database_command(data_dir, "stop")
        down_at = time.monotonic()
        time.sleep(OUTAGE_SECONDS)
        with pytest.raises(openai.APIStatusError) as refused:
            client.batches.create(input_file_id=later.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert refused.value.status_code == 503  # a clear 503, not a 500 or a reset
        assert refused.value.body["code"] == "database_unavailable" and "unreachable" in refused.value.body["message"]
        assert watchdog.process.poll() is None and all(not _gone(w.pid) for w in workers)
        database_command(data_dir, "start")
        print(f"\ndatabase down for {time.monotonic() - down_at:.1f} s")

        done = wait_for_batch(client, batch.id, 180)
        assert done.status == "completed" and done.request_counts.completed == 1500
        lines = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
        custom_ids = [line["custom_id"] for line in lines]
        assert len(custom_ids) == len(set(custom_ids)) == 1500
        with db.connect() as conn:
            attempts = conn.execute(sa.text("SELECT max(attempt) FROM batch_requests WHERE batch_id = :b"),
                                    {"b": batch.id}).scalar()
            restarts = conn.execute(sa.text("SELECT count(*) FROM worker_restarts WHERE slot = ANY(:s)"),
                                    {"s": [slot["slot"] for slot in SLOTS]}).scalar()
        assert attempts == 1  # no request was charged an attempt
        assert restarts == 0  # and no worker a restart
        assert watchdog.process.poll() is None  # the same watchdog
        assert [live_worker(db, slot["slot"]).pid for slot in SLOTS] == [w.pid for w in workers]  # the same workers

        # Retention went on where it was: the earlier batch's rows are gone, its output whole.
        wait_for(lambda: _rows(db, earlier.id) == 0, 60, message="the earlier batch's rows deleted")
        output = client.files.content(earlier.output_file_id).text.splitlines()
        assert len({json.loads(line)["custom_id"] for line in output}) == len(output) == 300
        page = httpx.get(f"{api.base_url}/v1/batches/{earlier.id}/output", headers={"Authorization": f"Bearer {API_KEY}"})
        assert page.text.splitlines() == output

        after = wait_for_batch(client, submit(client, [request_line(f"n{i}", MODEL) for i in range(50)]).id, 60)
        assert after.status == "completed" and after.request_counts.completed == 50

        table = batchctl(watchdog.env, "workers")
        assert table.returncode == 0, table.stderr
        rows = [[cell.strip() for cell in line.split("│")] for line in table.stdout.splitlines() if "outage-" in line]
        header = [cell.strip() for cell in next(line for line in table.stdout.splitlines() if "restarts" in line)
                  .replace("┃", "│").split("│")]  # rich draws the header's rules heavier
        column = header.index("restarts (1 h)")
        assert len(rows) == 2 and [row[column] for row in rows] == ["0", "0"], table.stdout
        log = (watchdog.log_dir / "watchdog.log").read_text()
        assert log.count("database unreachable while") == 1 and "database reachable again after" in log
        for slot in SLOTS:
            worker_log = (watchdog.log_dir / f"worker-{slot['slot']}.log").read_text()
            assert "database unreachable while" in worker_log and "database reachable again after" in worker_log


def _rows(db, batch_id: str) -> int:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM batch_requests WHERE batch_id = :b"), {"b": batch_id}).scalar()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True


def test_reads_go_on_when_the_database_closed_their_connections(db, api, client, live_model):
    """A restart closes every connection the API keeps for its reads on the event loop; the next
    read finds its connection dead, drops them all and answers from a new one, not a 503."""
    batch = submit(client, [request_line("r0", live_model)])
    assert client.batches.retrieve(batch.id).id == batch.id
    with db.connect() as conn:
        closed = conn.execute(sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                      "WHERE application_name LIKE 'api_server reads@%'")).scalar()
    assert closed >= 1
    for _ in range(3):
        assert client.with_options(max_retries=0).batches.retrieve(batch.id).id == batch.id
        assert batch.id in [b.id for b in client.with_options(max_retries=0).batches.list(limit=100).data]
