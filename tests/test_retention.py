"""Months of batches: a finished batch's results are stored once (in its files), its request rows
leave the queue's table, and the rest of the finished history goes after its retention period.
Real workers (test engines) under the real watchdog, through the HTTP API with the official SDK."""

from __future__ import annotations

import json
import os
import signal
import uuid

import httpx
import openai
import pytest
import sqlalchemy as sa

from core.batch_app.config import Settings
from core.batch_app.domain import registry
from core.batch_app.watchdog.retention import Retention

from .conftest import (
    API_KEY,
    batchctl,
    database_of_the_module,
    echo_slot,
    live_worker,
    running_watchdog,
    stack_env,
    start_api,
    wait_for,
    wait_for_batch,
)
from .jsonl import request_line, submit

database, db, api = database_of_the_module("retention")
PRUNING = {"FINISHED_REQUESTS_RETENTION": "0", "RETENTION_INTERVAL": "0.3", "RETENTION_BATCH_ROWS": "7"}


def request_rows(db, batch_id: str) -> int:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM batch_requests WHERE batch_id = :b"), {"b": batch_id}).scalar()


def pruned(db, batch_id: str) -> bool:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT requests_pruned_at IS NOT NULL FROM batches WHERE id = :b"),
                            {"b": batch_id}).scalar()


def pages(api, batch_id: str, limit: int, after: int = 0) -> list[str]:
    """Every line of GET /v1/batches/{id}/output from `after` on, `limit` a call."""
    lines = []
    while True:
        answer = httpx.get(f"{api.base_url}/v1/batches/{batch_id}/output", params={"after": after, "limit": limit},
                           headers={"Authorization": f"Bearer {API_KEY}"})
        assert answer.status_code == 200, answer.text
        got = answer.text.splitlines()
        assert int(answer.headers["X-Next-After"]) == after + len(got)
        if not got:
            return lines
        lines += got
        after += len(got)


def test_a_finished_batch_is_stored_once_and_still_answers_from_its_files(database, data_dir, db, client, api):
    slot = "kept-once-0"
    with running_watchdog(database, data_dir, "watchdog-stored-once", [echo_slot(slot, "FlakyEngine")], **PRUNING):
        wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        lines = [request_line(f"r{i}", slot, messages=[{"role": "user", "content": "flaky" if i % 5 == 0 else "ok"}])
                 for i in range(60)]
        parent = wait_for_batch(client, submit(client, lines, metadata={"team": "search"}, completion_window="2h",
                                               extra_body={"priority": 7}).id, 120)
        assert (parent.status, parent.request_counts.completed, parent.request_counts.failed) == ("completed", 48, 12)
        usage = parent.usage
        # Its rows go (a few a statement), its counts and usage stay exact.
        wait_for(lambda: pruned(db, parent.id), 60, message="the batch's rows deleted")
        assert request_rows(db, parent.id) == 0
        after = client.batches.retrieve(parent.id)
        assert (after.request_counts, after.usage) == (parent.request_counts, usage)

        # Its output pages come from the output file: the same lines, in pages of any size.
        output = client.files.content(parent.output_file_id).text.splitlines()
        assert len(output) == 48
        assert pages(api, parent.id, 5) == pages(api, parent.id, 10_000) == output
        assert pages(api, parent.id, 7, after=40) == output[40:]

        # A retry takes the unsuccessful lines from the input file, with the parent's settings.
        child = client.post(f"/batches/{parent.id}/retry", cast_to=openai.types.Batch)
        assert (child.endpoint, child.completion_window, child.metadata) == \
            ("/v1/chat/completions", "2h", {"team": "search", "retry_of": parent.id})
        with db.connect() as conn:
            assert conn.execute(sa.text("SELECT priority FROM batches WHERE id = :b"), {"b": child.id}).scalar() == 7
        retried = client.files.content(child.input_file_id).text.splitlines()
        assert [json.loads(line) for line in retried] == [lines[i] for i in range(0, 60, 5)]
        child = wait_for_batch(client, child.id, 120)
        assert (child.request_counts.completed, child.request_counts.failed) == (12, 0)

        # Once the output file is deleted its lines are gone everywhere; so is a retry without its input.
        client.files.delete(parent.output_file_id)
        gone = httpx.get(f"{api.base_url}/v1/batches/{parent.id}/output",
                         headers={"Authorization": f"Bearer {API_KEY}"})
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "output_file_gone"
        assert parent.output_file_id in gone.json()["error"]["message"]
        client.files.delete(parent.input_file_id)
        with pytest.raises(openai.ConflictError) as refused:
            client.post(f"/batches/{parent.id}/retry", cast_to=openai.types.Batch)
        assert refused.value.body["code"] == "input_file_gone" and refused.value.body["param"] == "input_file_id"
        assert parent.input_file_id in refused.value.body["message"]


def test_output_pages_are_bounded_by_bytes_and_after_is_bounded(database, data_dir, db, client):
    slot = "page-bytes-0"
    api = start_api(database, data_dir, "api-page-bytes", OUTPUT_PAGE_BYTES="2000")
    try:
        with running_watchdog(database, data_dir, "watchdog-page-bytes", [echo_slot(slot)]):
            wait_for(lambda: live_worker(db, slot), 60, message="worker up")
            batch = wait_for_batch(client, submit(client, [request_line(f"r{i}", slot) for i in range(40)]).id, 120)
        output = client.files.content(batch.output_file_id).text.splitlines()
        lines, after = [], 0
        while page := httpx.get(f"{api.base_url}/v1/batches/{batch.id}/output", params={"after": after},
                                headers={"Authorization": f"Bearer {API_KEY}"}).content:
            assert len(page) <= 2000 and page.endswith(b"\n")
            lines += page.decode().splitlines()
            after = len(lines)
        assert lines == output and len(output) == 40
        too_far = httpx.get(f"{api.base_url}/v1/batches/{batch.id}/output", params={"after": 2**63},
                            headers={"Authorization": f"Bearer {API_KEY}"})
        assert too_far.status_code == 400 and too_far.json()["error"]["param"] == "after"
    finally:
        api.stop()


def test_pages_read_while_running_continue_from_the_file_after_the_end(database, data_dir, db, client, api):
    # Two workers store their results interleaved: the order they finished in is not the lines'.
    model = "resume"
    slots = [{**echo_slot(model), "slot": f"resume-{i}"} for i in range(2)]
    with running_watchdog(database, data_dir, "watchdog-resume", slots, ECHO_STEP_SECONDS="0.05", **PRUNING):
        for slot in slots:
            wait_for(lambda: live_worker(db, slot["slot"]), 60, message="workers up")
        batch = submit(client, [request_line(f"r{i}", model) for i in range(200)])
        seen: list[str] = []
        while client.batches.retrieve(batch.id).status != "completed":
            seen += pages(api, batch.id, 17, after=len(seen))
        seen += pages(api, batch.id, 17, after=len(seen))
        wait_for(lambda: pruned(db, batch.id), 60, message="the batch's rows deleted")
        seen += pages(api, batch.id, 17, after=len(seen))
    output = client.files.content(client.batches.retrieve(batch.id).output_file_id).text.splitlines()
    assert seen == output and len({json.loads(line)["custom_id"] for line in seen}) == 200
    assert [json.loads(line)["custom_id"] for line in seen] != [f"r{i}" for i in range(200)]


def _history(db) -> dict[str, int]:
    """Rows of each kind of history made by `_make_history`."""
    with db.connect() as conn:
        return {table: conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE {column} LIKE 'retention-%'")).scalar()
                for table, column in (("webhook_events", "id"), ("workers", "slot"), ("worker_restarts", "slot"),
                                      ("slot_commands", "slot"))} | {
            "webhook_deliveries": conn.execute(sa.text(
                "SELECT count(*) FROM webhook_deliveries WHERE event_id LIKE 'retention-%'")).scalar()}


def _make_history(db, age: str, count: int) -> list[str]:
    """`count` rows of every kind of history, `age` old, ended; returns the workers' ids."""
    tag = f"retention-{uuid.uuid4().hex[:8]}"
    workers = [str(uuid.uuid4()) for _ in range(count)]
    with db.begin() as conn:
        conn.execute(sa.text("INSERT INTO webhook_endpoints (id, project, name, url, event_types, secret) "
                             "VALUES (:id, 'retention', '', 'https://example.invalid/', '{}', 'whsec_x')"), {"id": tag})
        for i, worker in enumerate(workers):
            event = f"{tag}-{i}"
            conn.execute(sa.text(f"INSERT INTO webhook_events (id, project, type, payload, created_at) "
                                 f"VALUES (:id, 'retention', 'batch.completed', '{{}}', now() - interval '{age}')"),
                         {"id": event})
            conn.execute(sa.text(f"INSERT INTO webhook_deliveries (event_id, endpoint_id, status, next_attempt_at, "
                                 f"delivered_at) VALUES (:e, :ep, 'delivered', now() - interval '{age}', "
                                 f"now() - interval '{age}')"), {"e": event, "ep": tag})
            registry.register_worker(conn, worker_id=worker, slot=tag, host="retention", pid=1, model="m", gpu_ids="")
            conn.execute(sa.text(f"UPDATE workers SET status = 'dead', stopped_at = now() - interval '{age}' "
                                 f"WHERE id = :w"), {"w": worker})
            conn.execute(sa.text(f"INSERT INTO worker_restarts (slot, host, reason, restarted_at) "
                                 f"VALUES (:s, 'retention', 'test', now() - interval '{age}')"), {"s": tag})
            conn.execute(sa.text(f"INSERT INTO slot_commands (host, slot, command, requested_at, taken_at) "
                                 f"VALUES ('retention', :s, 'restart', now() - interval '{age}', "
                                 f"now() - interval '{age}')"), {"s": tag})
    return workers


def test_history_older_than_its_retention_is_deleted_a_few_rows_a_statement(db, database):
    with db.begin() as conn:
        conn.execute(sa.text("DELETE FROM webhook_endpoints WHERE project = 'retention'"))
    _make_history(db, "3 hours", 10)
    recent = _make_history(db, "10 minutes", 4)
    # A stopped worker that still holds a running request keeps its row until the request is rescued.
    holder = _make_history(db, "3 hours", 1)[0]
    with db.begin() as conn:
        batch = f"batch_retention_{uuid.uuid4().hex[:8]}"
        conn.execute(sa.text("INSERT INTO batches (id, project, endpoint, input_file_id, completion_window, status) "
                             "VALUES (:b, 'retention', '/v1/chat/completions', 'file-x', '24h', 'in_progress')"),
                     {"b": batch})
        conn.execute(sa.text("INSERT INTO batch_requests (batch_id, line, custom_id, model, project, body, status, "
                             "worker_id) VALUES (:b, 1, 'r1', 'm', 'retention', '{}', 'running', :w)"),
                     {"b": batch, "w": holder})
    settings = Settings(webhook_delivery_retention=3600, worker_history_retention=3600,
                        restart_history_retention=3600, retention_batch_rows=3, finished_requests_retention=3600)
    deleted = Retention(db, settings).run_round()
    # Other tests' history may be old enough too; ours is what can be counted exactly.
    assert all(deleted[name] >= 10 for name in ("webhook deliveries", "webhook events", "stopped workers",
                                                "taken commands", "restart history")), deleted
    assert _history(db) == {"webhook_events": 4, "workers": 4 + 1, "worker_restarts": 4, "slot_commands": 4,
                            "webhook_deliveries": 4}
    with db.connect() as conn:
        kept = set(conn.execute(sa.text("SELECT id::text FROM workers WHERE slot LIKE 'retention-%'")).scalars())
    assert kept == set(recent) | {holder}
    with db.begin() as conn:
        conn.execute(sa.text("DELETE FROM batches WHERE id = :b"), {"b": batch})


def test_storage_is_shown_to_operators(database, data_dir, api):
    shown = batchctl(stack_env(database, data_dir, "storage"), "storage")
    assert shown.returncode == 0, shown.stderr
    for words in ("batch_requests", "file_chunks", "finished batches", "oldest", "retention"):
        assert words in shown.stdout, shown.stdout
    metrics = httpx.get(f"{api.base_url}/metrics").text
    assert 'batch_database_bytes{table="batch_requests"}' in metrics


def test_pruning_while_a_worker_is_killed_loses_nothing(database, data_dir, db, client, api):
    model = "prune-kill"
    slots = [{**echo_slot(model), "slot": f"prune-kill-{i}"} for i in range(2)]
    with running_watchdog(database, data_dir, "watchdog-prune-kill", slots, ECHO_STEP_SECONDS="0.05",
                          FINISHED_REQUESTS_RETENTION="600", RETENTION_INTERVAL="0.2", RETENTION_BATCH_ROWS="1",
                          HEARTBEAT_INTERVAL="0.5", RESTART_BACKOFF_MIN="0.2"):
        workers = [wait_for(lambda: live_worker(db, slot["slot"]), 60, message="workers up") for slot in slots]
        earlier = wait_for_batch(client, submit(client, [request_line(f"e{i}", model) for i in range(300)]).id, 60)
        batch = submit(client, [request_line(f"r{i}", model) for i in range(600)])
        wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed > 100, 60, message="progress")
        with db.begin() as conn:  # due for deletion, a row a transaction, while the batch runs
            conn.execute(sa.text("UPDATE batches SET completed_at = now() - interval '1 hour' WHERE id = :b"),
                         {"b": earlier.id})
        wait_for(lambda: request_rows(db, earlier.id) < 300, 30, interval=0.05, message="retention deleting rows")
        os.kill(workers[0].pid, signal.SIGKILL)
        done = wait_for_batch(client, batch.id, 120)
        wait_for(lambda: pruned(db, earlier.id), 60, message="the earlier batch's rows deleted")
    assert done.status == "completed" and done.request_counts.completed == 600
    custom_ids = [json.loads(line)["custom_id"] for line in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(custom_ids) == sorted(f"r{i}" for i in range(600))
    output = client.files.content(earlier.output_file_id).text.splitlines()
    assert pages(api, earlier.id, 100) == output and len(output) == 300
