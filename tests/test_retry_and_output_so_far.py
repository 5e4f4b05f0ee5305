"""Beyond the hosted APIs: retrying only what did not succeed, the finished part of a running batch
downloaded (and resumed), and an estimate of when a running batch ends. Real workers (test
engines) under the real watchdog, through the HTTP API with the official SDK."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from .conftest import API_KEY, batchctl, echo_slot, live_worker, running_watchdog, wait_for, wait_for_batch
from .jsonl import request_line, submit


def output_custom_ids(client, batch) -> list[str]:
    return [json.loads(line)["custom_id"] for line in client.files.content(batch.output_file_id).text.splitlines()]


def test_a_retry_runs_only_the_lines_that_did_not_succeed(database, data_dir, db, client, api):
    slot = "flaky-0"
    with running_watchdog(database, data_dir, "watchdog-retry", [echo_slot(slot, "FlakyEngine")]) as watchdog:
        wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        lines = [request_line(f"r{i}", slot, messages=[{"role": "user", "content": "flaky" if i % 4 == 0 else "ok"}])
                 for i in range(20)]
        parent = wait_for_batch(client, submit(client, lines, metadata={"team": "search"}).id, 120)
        assert (parent.status, parent.request_counts.completed, parent.request_counts.failed) == ("completed", 15, 5)

        with pytest.raises(openai.ConflictError) as running:
            busy = submit(client, [request_line("x", slot)])
            client.post(f"/batches/{busy.id}/retry", cast_to=openai.types.Batch)
        assert running.value.body["code"] in ("batch_not_finished", "nothing_to_retry")

        retried = batchctl(watchdog.env, "--api-url", f"{api.base_url}/v1", "retry", parent.id)
        assert retried.returncode == 0, retried.stderr
        child_id = retried.stdout.split()[1]
        child = wait_for_batch(client, child_id, 120)
        assert child.metadata == {"team": "search", "retry_of": parent.id}
        assert (child.request_counts.total, child.request_counts.completed, child.request_counts.failed) == (5, 5, 0)
        assert sorted(output_custom_ids(client, child)) == sorted(f"r{i}" for i in range(0, 20, 4))
        # Together the two batches answered every line once.
        assert sorted(output_custom_ids(client, parent) + output_custom_ids(client, child)) == \
            sorted(f"r{i}" for i in range(20))

        with pytest.raises(openai.ConflictError) as nothing:
            client.post(f"/batches/{child.id}/retry", cast_to=openai.types.Batch)
        assert nothing.value.body["code"] == "nothing_to_retry"
        with pytest.raises(openai.NotFoundError):
            client.post("/batches/batch_nope/retry", cast_to=openai.types.Batch)


def test_the_finished_part_of_a_running_batch_downloads_and_resumes(database, data_dir, db, client, api):
    slot = "steady-0"
    with running_watchdog(database, data_dir, "watchdog-so-far", [echo_slot(slot)], ECHO_STEP_SECONDS="0.1"):
        wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        batch = submit(client, [request_line(f"r{i}", slot) for i in range(300)])
        headers = {"Authorization": f"Bearer {API_KEY}"}
        seen: list[str] = []
        after, calls, estimates = 0, 0, []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = client.batches.retrieve(batch.id)
            if status.status == "in_progress" and status.request_counts.completed:
                estimates.append((time.time(), status.model_extra["estimated_completion_at"]))
            response = httpx.get(f"{api.base_url}/v1/batches/{batch.id}/output", params={"after": after, "limit": 50},
                                 headers=headers, timeout=30)
            assert response.status_code == 200 and response.headers["content-type"].startswith("application/jsonl")
            lines = [json.loads(line) for line in response.text.splitlines()]
            assert int(response.headers["X-Next-After"]) == after + len(lines)
            seen += [line["custom_id"] for line in lines]
            after += len(lines)
            calls += 1
            if status.status == "completed" and not lines:
                break
            time.sleep(0.3)
        done = client.batches.retrieve(batch.id)
        assert done.status == "completed" and calls > 3
        assert len(seen) == len(set(seen)) == 300
        assert set(seen) == set(output_custom_ids(client, done))
        # 300 requests at about 40 a second: each estimate is ahead of its reading, by under two minutes.
        assert estimates and all(read - 1 <= estimate <= read + 120 for read, estimate in estimates), estimates
        assert done.model_extra["estimated_completion_at"] is None

        other = httpx.get(f"{api.base_url}/v1/batches/batch_nope/output", headers=headers, timeout=30)
        assert other.status_code == 404 and other.json()["error"]["param"] == "batch_id"
        bad = httpx.get(f"{api.base_url}/v1/batches/{batch.id}/output", params={"after": -1}, headers=headers,
                        timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
