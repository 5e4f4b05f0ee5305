"""Beyond the hosted APIs: retrying only what did not succeed, the finished part of a running batch
downloaded (and resumed), and an estimate of when a running batch ends. Real workers (test
engines) under the real watchdog, through the HTTP API with the official SDK."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import openai
import pytest
import sqlalchemy as sa

from .conftest import API_KEY, batchctl, echo_slot, live_worker, running_watchdog, wait_for, wait_for_batch
from .jsonl import request_line, submit


def output_custom_ids(client, batch) -> list[str]:
    return [json.loads(line)["custom_id"] for line in client.files.content(batch.output_file_id).text.splitlines()]


def settings_of(db, batch_id: str) -> tuple:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT endpoint, completion_window, priority, output_expires_after, metadata "
                                    "FROM batches WHERE id = :id"), {"id": batch_id}).one()


def retry(client, batch_id: str):
    return client.post(f"/batches/{batch_id}/retry", cast_to=openai.types.Batch)


def test_a_retry_runs_only_the_lines_that_did_not_succeed(database, data_dir, db, client, api):
    slot = "flaky-0"
    with running_watchdog(database, data_dir, "watchdog-retry", [echo_slot(slot, "FlakyEngine")],
                          HOUSEKEEPING_INTERVAL="0.5") as watchdog:
        wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        lines = [request_line(f"r{i}", slot, messages=[{"role": "user", "content": "flaky" if i % 4 == 0 else "ok"}])
                 for i in range(20)]
        parent = wait_for_batch(client, submit(client, lines, metadata={"team": "search"}, completion_window="2h",
                                               extra_body={"priority": 7, "output_expires_after": {
                                                   "anchor": "created_at", "seconds": 7200}}).id, 120)
        assert (parent.status, parent.request_counts.completed, parent.request_counts.failed) == ("completed", 15, 5)

        retried = batchctl(watchdog.env, "--api-url", f"{api.base_url}/v1", "retry", parent.id)
        assert retried.returncode == 0, retried.stderr
        child_id = retried.stdout.split()[1]
        child = wait_for_batch(client, child_id, 120)
        # Its parent's endpoint, window, priority and output expiry; its metadata naming the parent.
        assert settings_of(db, child_id) == ("/v1/chat/completions", "2h", 7, 7200,
                                             {"team": "search", "retry_of": parent.id})
        assert (child.request_counts.total, child.request_counts.completed, child.request_counts.failed) == (5, 5, 0)
        assert sorted(output_custom_ids(client, child)) == sorted(f"r{i}" for i in range(0, 20, 4))
        # Together the two batches answered every line once.
        assert sorted(output_custom_ids(client, parent) + output_custom_ids(client, child)) == \
            sorted(f"r{i}" for i in range(20))

        with pytest.raises(openai.ConflictError) as nothing:
            retry(client, child.id)
        assert nothing.value.body["code"] == "nothing_to_retry"
        with pytest.raises(openai.NotFoundError):
            retry(client, "batch_nope")

        # With the worker stopped for a moment: a batch still running, one cancelled, one expired.
        worker = live_worker(db, slot)
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            unfinished = submit(client, [request_line("u0", slot)])
            with pytest.raises(openai.ConflictError) as running:
                retry(client, unfinished.id)
            assert running.value.body["code"] == "batch_not_finished"
            cancelled = submit(client, [request_line(f"c{i}", slot) for i in range(3)])
            client.batches.cancel(cancelled.id)
            expired = submit(client, [request_line(f"e{i}", slot) for i in range(3)], completion_window="3s")
            cancelled, expired = wait_for_batch(client, cancelled.id, 30), wait_for_batch(client, expired.id, 30)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        assert (cancelled.status, expired.status) == ("cancelled", "expired")
        for ended, prefix in ((cancelled, "c"), (expired, "e")):
            again = wait_for_batch(client, retry(client, ended.id).id, 60)
            assert (again.status, again.completion_window) == ("completed", ended.completion_window)
            assert sorted(output_custom_ids(client, again)) == [f"{prefix}{i}" for i in range(3)]
        assert wait_for_batch(client, unfinished.id, 60).status == "completed"


def test_the_finished_part_of_a_running_batch_downloads_and_resumes(database, data_dir, db, client, api):
    slot = "steady-0"
    with running_watchdog(database, data_dir, "watchdog-so-far", [echo_slot(slot)], ECHO_STEP_SECONDS="0.1"):
        wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        batch = submit(client, [request_line(f"r{i}", slot) for i in range(300)])
        headers = {"Authorization": f"Bearer {API_KEY}"}
        seen: list[str] = []
        after, calls, while_running, estimates = 0, 0, 0, []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            response = httpx.get(f"{api.base_url}/v1/batches/{batch.id}/output", params={"after": after, "limit": 50},
                                 headers=headers, timeout=30)
            asked = time.time()
            status = client.batches.retrieve(batch.id)  # after the page: in_progress means it came while running
            answered = time.time()
            assert response.status_code == 200 and response.headers["content-type"].startswith("application/jsonl")
            lines = [json.loads(line) for line in response.text.splitlines()]
            assert int(response.headers["X-Next-After"]) == after + len(lines)
            seen += [line["custom_id"] for line in lines]
            after += len(lines)
            calls += 1
            if status.status == "in_progress":
                while_running += len(lines)
                counts = status.request_counts
                if counts.completed:
                    estimates.append((asked, answered, status))
            if status.status == "completed" and not lines:
                break
            time.sleep(0.3)
        done = client.batches.retrieve(batch.id)
        assert done.status == "completed" and calls > 3
        assert 0 < while_running < 300  # lines came back while it ran, the rest after
        assert len(seen) == len(set(seen)) == 300
        assert set(seen) == set(output_custom_ids(client, done))
        # Each estimate is the batch's end at its pace so far: what is left at the time per line since
        # it started. The server read its clock between asked and answered, and in_progress_at is
        # rounded down to the second, which bounds the estimate both ways whatever the machine's speed
        # (the real end is not the bound: a machine that stalls for a minute moves it).
        assert estimates
        for asked, answered, status in estimates:
            started, counts = status.in_progress_at, status.request_counts
            finished, left = counts.completed + counts.failed, counts.total - counts.completed - counts.failed
            earliest = asked + left * (asked - started - 1) / finished
            latest = answered + left * (answered - started) / finished
            assert earliest - 1 <= status.model_extra["estimated_completion_at"] <= latest + 1, (asked, answered, status)
        assert done.model_extra["estimated_completion_at"] is None

        other = httpx.get(f"{api.base_url}/v1/batches/batch_nope/output", headers=headers, timeout=30)
        assert other.status_code == 404 and other.json()["error"]["param"] == "batch_id"
        bad = httpx.get(f"{api.base_url}/v1/batches/{batch.id}/output", params={"after": -1}, headers=headers,
                        timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
