"""Batches API: create, retrieve, list with pagination, cancel, and every validation error."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import sqlalchemy as sa

from core.batch_app.api.batch_endings import RECHECK
from core.batch_app.domain.batch_format import MAX_WAIT

from .conftest import TEST_MODEL, start_api
from .jsonl import jsonl, request_line, submit, upload


def test_create_retrieve_and_cancel_a_queued_batch(project_client, live_model, db):
    batch = submit(project_client, [request_line(f"r{i}", live_model) for i in range(4)],
                   metadata={"team": "search"})
    assert batch.status == "validating"
    assert batch.model == live_model and batch.endpoint == "/v1/chat/completions"
    assert batch.request_counts.total == 4 and batch.request_counts.completed == 0
    assert batch.metadata == {"team": "search"}
    assert batch.expires_at - batch.created_at == 24 * 3600
    assert project_client.batches.retrieve(batch.id) == batch

    cancelled = project_client.batches.cancel(batch.id)
    assert cancelled.status == "cancelled"
    assert cancelled.cancelling_at is not None and cancelled.cancelled_at is not None
    assert cancelled.output_file_id is None  # nothing had finished
    lines = [json.loads(line) for line in project_client.files.content(cancelled.error_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["r0", "r1", "r2", "r3"]
    assert {line["error"]["code"] for line in lines} == {"batch_cancelled"}
    assert all(line["id"].startswith("batch_req_") and line["response"] is None for line in lines)
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM batch_requests WHERE batch_id = :b AND status = 'queued'"),
                            {"b": batch.id}).scalar() == 0

    assert project_client.batches.cancel(batch.id).status == "cancelled"  # cancelling twice is harmless


def test_a_held_retrieve_answers_as_soon_as_the_batch_ends(project_client, live_model):
    batch = submit(project_client, [request_line("r0", live_model)])
    started = time.monotonic()
    held = project_client.batches.retrieve(batch.id, extra_query={"wait": 0.5})
    assert held.status == "validating" and time.monotonic() - started >= 0.5  # held for the whole wait

    def held_retrieve():
        return project_client.batches.retrieve(batch.id, extra_query={"wait": 30}), time.monotonic()

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(held_retrieve)
        time.sleep(1.0)
        cancelled_at = time.monotonic()
        project_client.batches.cancel(batch.id)
        ended, answered_at = answer.result(timeout=60)
    assert ended.status == "cancelled"
    # Woken by the batch's notification, not by the re-read every RECHECK seconds.
    assert answered_at - cancelled_at < RECHECK - 2
    started = time.monotonic()
    assert project_client.batches.retrieve(batch.id, extra_query={"wait": 30}).status == "cancelled"
    assert time.monotonic() - started < RECHECK - 2  # an ended batch is never held

    with pytest.raises(openai.BadRequestError) as caught:
        project_client.batches.retrieve(batch.id, extra_query={"wait": MAX_WAIT + 1})
    assert caught.value.body["param"] == "wait"


def test_cancel_a_failed_batch_is_409(project_client, live_model):
    failed = submit(project_client, [b"not json"])
    assert failed.status == "failed"
    with pytest.raises(openai.ConflictError) as caught:
        project_client.batches.cancel(failed.id)
    assert caught.value.body["code"] == "batch_not_cancellable"


def test_list_paginates_newest_first(project_client, live_model):
    ids = [submit(project_client, [request_line("a", live_model)]).id for _ in range(5)]
    first = project_client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    second = project_client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == ids[::-1][2:4]
    assert [b.id for b in project_client.batches.list(limit=2)] == ids[::-1]  # the SDK pages through all
    raw = project_client.batches.with_raw_response.list(limit=3).http_response.json()
    assert raw["first_id"] == ids[-1] and raw["last_id"] == ids[-3] and raw["has_more"] is True
    assert project_client.batches.list().data[0].id == ids[-1]  # default limit 20 holds them all
    with pytest.raises(openai.BadRequestError):
        project_client.batches.list(limit=101)


def test_priority_is_stored_from_an_extra_body_field(project_client, live_model, db):
    batch = submit(project_client, [request_line("a", live_model)], extra_body={"priority": 7})
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT DISTINCT priority FROM batch_requests WHERE batch_id = :b"),
                            {"b": batch.id}).scalar() == 7


def errors_of(batch) -> list[tuple[str, int | None]]:
    assert batch.status == "failed" and batch.failed_at is not None
    return [(error.code, error.line) for error in batch.errors.data]


GOOD = request_line("good", TEST_MODEL)


@pytest.mark.parametrize(("lines", "expected"), [
    ([b'{"custom_id": "a",'], [("invalid_json_line", 1)]),
    ([GOOD, b"[1, 2]"], [("invalid_json_line", 2)]),
    ([{k: v for k, v in GOOD.items() if k != "custom_id"}], [("missing_required_parameter", 1)]),
    ([dict(GOOD, custom_id=5)], [("invalid_type", 1)]),
    ([{k: v for k, v in GOOD.items() if k != "method"}], [("missing_required_parameter", 1)]),
    ([dict(GOOD, method="GET")], [("invalid_method", 1)]),
    ([{k: v for k, v in GOOD.items() if k != "url"}], [("missing_required_parameter", 1)]),
    ([dict(GOOD, url=7)], [("invalid_type", 1)]),
    ([dict(GOOD, url="/v1/images")], [("invalid_url", 1)]),
    ([{k: v for k, v in GOOD.items() if k != "body"}], [("missing_required_parameter", 1)]),
    ([dict(GOOD, body="text")], [("invalid_type", 1)]),
    ([dict(GOOD, body={"messages": []})], [("missing_required_parameter", 1)]),
    ([GOOD, GOOD], [("duplicate_custom_id", 2)]),
    ([GOOD, request_line("b", TEST_MODEL, url="/v1/completions")], [("url_mismatch", 2)]),
    ([GOOD, request_line("b", "other-model")], [("model_mismatch", 2)]),
    ([request_line("a", "nobody-serves-this")], [("model_not_found", 1)]),
    ([GOOD, b"\xff\xfe not utf-8"], [("invalid_json_line", 2)]),
    ([GOOD, b"", request_line("b", TEST_MODEL)], [("invalid_json_line", 2)]),
    ([request_line("nul", TEST_MODEL, messages=[{"role": "user", "content": "a\u0000b"}])], [("invalid_json_line", 1)]),
    ([b'{"x": "' + b"y" * (10 * 1024 * 1024) + b'"}'], [("line_too_long", 1)]),
])
def test_validation_errors_name_the_line(project_client, live_model, lines, expected, db):
    batch = submit(project_client, lines)
    assert errors_of(batch) == expected
    assert all(error.message for error in batch.errors.data)
    with db.connect() as conn:  # nothing of a failed file is queued
        assert conn.execute(sa.text("SELECT count(*) FROM batch_requests WHERE batch_id = :b"),
                            {"b": batch.id}).scalar() == 0


def test_truncated_last_line_is_reported(project_client, live_model):
    content = jsonl([GOOD]) + b'{"custom_id": "b", "method": "PO'
    batch = project_client.batches.create(input_file_id=upload(project_client, content).id,
                                          endpoint="/v1/chat/completions", completion_window="24h")
    assert errors_of(batch) == [("invalid_json_line", 2)]
    assert "cut short" in batch.errors.data[0].message


def test_last_line_without_newline_is_accepted(project_client, live_model):
    content = jsonl([GOOD]) + json.dumps(request_line("b", live_model)).encode()
    batch = project_client.batches.create(input_file_id=upload(project_client, content).id,
                                          endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "validating" and batch.request_counts.total == 2


def test_empty_file(project_client, live_model):
    assert errors_of(submit(project_client, [])) == [("empty_file", None)]


def test_request_parameters_are_checked(project_client, live_model):
    file = upload(project_client, jsonl([GOOD]))
    cases = [
        (dict(endpoint="/v1/images/generations", completion_window="24h"), "endpoint"),
        (dict(endpoint="/v1/chat/completions", completion_window="1 day"), "completion_window"),
        (dict(endpoint="/v1/chat/completions", completion_window="24h",
              metadata={f"k{i}": "v" for i in range(17)}), "metadata"),
        (dict(endpoint="/v1/chat/completions", completion_window="24h", metadata={"k" * 65: "v"}), "metadata"),
        (dict(endpoint="/v1/chat/completions", completion_window="24h", metadata={"k": "v" * 513}), "metadata"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            project_client.batches.create(input_file_id=file.id, **kwargs)
        assert caught.value.body["param"] == param, kwargs
    with pytest.raises(openai.NotFoundError):
        project_client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                                      completion_window="24h")


def test_fifty_thousand_line_file(project_client, live_model):
    lines = [request_line(f"req-{i}", live_model) for i in range(50_000)]
    batch = submit(project_client, lines)
    assert batch.status == "validating" and batch.request_counts.total == 50_000


@pytest.fixture(scope="module")
def few_tasks_api(database, data_dir):
    server = start_api(database, data_dir, "api-few-tasks", MAX_FILE_LINES="3")
    yield server
    server.stop()


def test_too_many_tasks(few_tasks_api, live_model):
    client = few_tasks_api.client()
    batch = submit(client, [request_line(f"r{i}", live_model) for i in range(4)])
    assert errors_of(batch) == [("too_many_tasks", 4)]


def test_batch_for_an_offline_model_is_refused_with_503(project_client, db, live_model):
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE workers SET last_seen = now() - interval '5 minutes' WHERE model = :m"),
                     {"m": live_model})
    before = len(project_client.batches.list().data)
    with pytest.raises(openai.InternalServerError) as caught:
        submit(project_client, [GOOD])
    assert caught.value.status_code == 503
    assert caught.value.body["message"].startswith("Worker offline (last seen 300 s ago)")
    assert len(project_client.batches.list().data) == before


def test_offline_model_is_queued_when_live_worker_not_required(database, data_dir, db, live_model):
    server = start_api(database, data_dir, "api-queue-anyway", REQUIRE_LIVE_WORKER="false")
    try:
        with db.begin() as conn:
            conn.execute(sa.text("UPDATE workers SET last_seen = now() - interval '5 minutes' WHERE model = :m"),
                         {"m": live_model})
        assert submit(server.client(), [GOOD]).status == "validating"
    finally:
        server.stop()


def test_live_models_are_listed(client, live_model):
    assert live_model in [model.id for model in client.models.list()]


def test_retrieving_a_batch_costs_the_same_whatever_its_size(project_client, live_model, db):
    from core.batch_app.domain.batches import get_batch
    from core.batch_app.domain.query import run

    from .simulated_worker import answer, claim, complete, new_worker

    worker = new_worker(db, live_model)
    sizes = {}
    for size in (5, 5000):
        batch = submit(project_client, [request_line(f"r{i}", live_model) for i in range(size)])
        while claimed := claim(db, worker, live_model, 1000):
            complete(db, worker, [answer(request) for request in claimed])
        sizes[size] = batch.id
    with db.connect() as conn:
        project = conn.execute(sa.text("SELECT project FROM batches WHERE id = :b"), {"b": sizes[5]}).scalar()
    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    per_size = {}
    sa.event.listen(db, "before_cursor_execute", record)
    try:
        for size, batch_id in sizes.items():
            statements.clear()
            with db.connect() as conn:
                body = run(conn, get_batch(project, batch_id))
            assert body["request_counts"] == {"total": size, "completed": size, "failed": 0}
            assert body["usage"]["output_tokens"] == 2 * size
            per_size[size] = list(statements)
    finally:
        sa.event.remove(db, "before_cursor_execute", record)
    assert len(per_size[5]) == len(per_size[5000])
    assert not [s for s in per_size[5000] if "batch_requests" in s]  # no request row is counted
