"""`GET /metrics` from a real API server, parsed with prometheus_client's own parser."""

from __future__ import annotations

import httpx
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from core.batch_app.domain import finalize

from .jsonl import request_line, submit
from .simulated_worker import answer, claim, complete, new_worker


def scrape(api) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of every sample."""
    response = httpx.get(f"{api.base_url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics_count_a_finished_batch(api, client, db, own_model):
    before = scrape(api)
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(5)])
    worker = new_worker(db, own_model)
    requests = claim(db, worker, own_model, 5)
    complete(db, worker, [answer(request) for request in requests[:4]])
    during = scrape(api)
    assert during[("batch_requests", (("model", own_model), ("status", "succeeded")))] == 4
    assert during[("batch_requests", (("model", own_model), ("status", "running")))] == 1
    complete(db, worker, [answer(requests[4])])
    finalize.finalize_ready(db, [batch.id])

    after = scrape(api)
    assert after[("batch_requests", (("model", own_model), ("status", "succeeded")))] == 5
    assert ("batch_requests", (("model", own_model), ("status", "running"))) not in after
    completed = ("batches", (("status", "completed"),))
    assert after[completed] == before.get(completed, 0) + 1
    # answer() reports 3 prompt and 2 generated tokens per request.
    assert after[("batch_tokens_total", (("kind", "generated"), ("model", own_model)))] == 10
    assert after[("batch_tokens_total", (("kind", "prompt"), ("model", own_model)))] == 15
    waits = ("batch_queue_wait_seconds_count", ())
    assert after[waits] == before.get(waits, 0) + 1  # the batch's wait for its first claim
    assert after[("batch_queue_wait_seconds_bucket", (("le", "+Inf"),))] == after[waits]
    durations = ("batch_duration_seconds_count", ())
    assert after[durations] == before.get(durations, 0) + 1
    assert after[("batch_duration_seconds_bucket", (("le", "60.0"),))] >= 1  # this one took seconds

    age = ("batch_worker_heartbeat_age_seconds", (("kind", "worker"), ("model", own_model), ("slot", "q")))
    assert 0 <= after[age] < 60
    assert after[("batch_worker_status", (("kind", "worker"), ("model", own_model), ("slot", "q"),
                                          ("status", "loading")))] == 1


def test_metric_labels_never_carry_ids(api, client, db, live_model):
    submit(client, [request_line("x", live_model)])
    with db.connect() as conn:
        tables = set(conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    for (_, labels), _ in scrape(api).items():
        for name, value in labels:
            assert name in ("model", "status", "kind", "slot", "le", "backend", "error", "table")
            if name == "table":  # batch_database_bytes: a table's name (batch_requests...), never an id
                assert value in tables
            else:
                assert not value.startswith(("batch_", "file-", "/"))


def test_metrics_count_the_unfinished_part_of_a_cancelled_batch(api, client, db, own_model):
    batch = submit(client, [request_line(f"c{i}", own_model) for i in range(3)])
    worker = new_worker(db, own_model)
    complete(db, worker, [answer(claim(db, worker, own_model, 1)[0])])
    client.batches.cancel(batch.id)
    after = scrape(api)
    assert after[("batch_requests", (("model", own_model), ("status", "cancelled")))] == 2
    assert after[("batch_requests", (("model", own_model), ("status", "succeeded")))] == 1
    assert ("batch_requests", (("model", own_model), ("status", "queued"))) not in after
