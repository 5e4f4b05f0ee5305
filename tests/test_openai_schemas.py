"""Every answer of the main flows, and every output body of the in-process engine, validated
against OpenAI's published OpenAPI document with exact JSON types (see tests/openai_schema.py for
the one allowance: an optional field may be null)."""

from __future__ import annotations

import json

import httpx
import pytest

from core.batch_app.domain import finalize
from core.batch_app.domain.statuses import BatchStatus
from core.batch_app.domain.webhooks import BATCH_EVENTS, event_payload

from .conftest import API_KEY
from .jsonl import jsonl, request_line
from .openai_schema import assert_valid, errors
from .simulated_worker import answer, claim, complete, new_worker


def test_the_checker_refuses_what_openai_would_not_send():
    """The allowance for null stops at optional fields: types and required fields stay exact."""
    counts = {"total": 2, "completed": 1, "failed": 0}
    assert not errors("BatchRequestCounts", counts)
    assert errors("BatchRequestCounts", {**counts, "completed": "1"})  # a count as a string
    assert errors("BatchRequestCounts", {**counts, "completed": 1.0})  # or as a float
    assert errors("BatchRequestCounts", {**counts, "total": None})  # a required count as null
    assert not errors("OpenAIFile", {"id": "file-1", "object": "file", "bytes": 1, "created_at": 1,
                                     "filename": "a", "purpose": "batch", "status": "processed",
                                     "expires_at": None})  # optional: OpenAI answers null


@pytest.fixture
def raw(api):
    """An HTTP client that sees the JSON exactly as sent (the SDK would convert types quietly)."""
    with httpx.Client(base_url=f"{api.base_url}/v1", headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as client:
        yield client


def _json(response: httpx.Response, status: int = 200):
    assert response.status_code == status, response.text
    return response.json()


def test_every_answer_of_the_main_flows_follows_openais_schemas(raw, db, own_model):
    lines = [request_line(f"r{i}", own_model) for i in range(3)]
    uploaded = _json(raw.post("/files", files={"file": ("in.jsonl", jsonl(lines))}, data={"purpose": "batch"}))
    assert_valid("OpenAIFile", uploaded)
    assert_valid("OpenAIFile", _json(raw.get(f"/files/{uploaded['id']}")))
    assert_valid("ListFilesResponse", _json(raw.get("/files", params={"limit": 5})))

    create = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    created = _json(raw.post("/batches", json=create))
    assert_valid("Batch", created)
    worker = new_worker(db, own_model)
    complete(db, worker, [answer(request) for request in claim(db, worker, own_model, 2)])
    running = _json(raw.get(f"/batches/{created['id']}"))
    assert running["status"] == BatchStatus.IN_PROGRESS and running["usage"]["input_tokens"] == 6
    assert_valid("Batch", running)
    complete(db, worker, [answer(request) for request in claim(db, worker, own_model, 1)])
    finalize.finalize_ready(db, [created["id"]])
    held = _json(raw.get(f"/batches/{created['id']}", params={"wait": 30}))
    assert held["status"] == BatchStatus.COMPLETED
    assert (held["usage"]["input_tokens"], held["usage"]["output_tokens"], held["usage"]["total_tokens"]) == (9, 6, 15)
    assert_valid("Batch", held)
    listed = _json(raw.get("/batches", params={"limit": 3}))
    assert created["id"] in [batch["id"] for batch in listed["data"]]
    assert_valid("ListBatchesResponse", listed)

    to_cancel = _json(raw.post("/batches", json=create))
    cancelled = _json(raw.post(f"/batches/{to_cancel['id']}/cancel"))
    assert cancelled["status"] in (BatchStatus.CANCELLING, BatchStatus.CANCELLED)
    assert_valid("Batch", cancelled)

    output = _json(raw.get(f"/files/{held['output_file_id']}"))
    assert_valid("OpenAIFile", output)
    assert_valid("DeleteFileResponse", _json(raw.delete(f"/files/{uploaded['id']}")))

    assert_valid("ErrorResponse", _json(raw.get("/batches/batch_missing"), 404))
    assert_valid("ErrorResponse", _json(raw.post("/batches", json={**create, "endpoint": "/v1/x"}), 400))
    assert_valid("ErrorResponse", _json(raw.get("/files/file-missing"), 404))


@pytest.mark.parametrize("status", list(BATCH_EVENTS))
def test_webhook_payloads_follow_openais_schemas(status):
    event_type = BATCH_EVENTS[status]
    schema = "Webhook" + "".join(word.capitalize() for word in event_type.split("."))
    assert_valid(schema, json.loads(event_payload("evt_1", event_type, "batch_1")))
