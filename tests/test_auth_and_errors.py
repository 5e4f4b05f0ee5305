"""Keys, project isolation, and OpenAI's error shape on every failure."""

from __future__ import annotations

import httpx
import openai
import pytest

from core.batch_app.domain.keys import seed_key

from .conftest import API_KEY, start_api
from .jsonl import request_line, submit, upload


def test_projects_see_only_their_own_objects(api, db, live_model, project_client):
    other = api.client()  # the default project's key
    file = upload(project_client, b"{}\n")
    batch = submit(project_client, [request_line("a", live_model)])
    for call in (lambda: other.files.retrieve(file.id), lambda: other.files.content(file.id),
                 lambda: other.files.delete(file.id), lambda: other.batches.retrieve(batch.id),
                 lambda: other.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert file.id not in [f.id for f in other.files.list()]
    assert batch.id not in [b.id for b in other.batches.list()]
    with pytest.raises(openai.NotFoundError):  # another project's file cannot feed a batch either
        other.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_bad_or_missing_key_is_401(api, headers):
    response = httpx.get(f"{api.base_url}/v1/batches", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")


def test_sdk_raises_authentication_error(api):
    with pytest.raises(openai.AuthenticationError):
        api.client("sk-nope").batches.list()


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("GET", "/v1/unknown", {}, 404),
    ("DELETE", "/v1/batches", {}, 405),
    ("POST", "/v1/batches", {"content": b"not json", "headers": {"Content-Type": "application/json"}}, 400),
    ("POST", "/v1/batches", {"json": {"endpoint": "/v1/chat/completions"}}, 400),
    ("GET", "/v1/batches?limit=0", {}, 400),
    ("GET", "/v1/batches/batch_missing", {}, 404),
    ("POST", "/v1/files", {"data": {"purpose": "batch"}}, 400),
])
def test_every_error_has_openai_shape(api, method, path, kwargs, status):
    headers = {"Authorization": f"Bearer {API_KEY}", **kwargs.pop("headers", {})}
    response = httpx.request(method, f"{api.base_url}{path}", headers=headers, **kwargs)
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


def test_health_and_ready(api):
    health = httpx.get(f"{api.base_url}/health").json()
    assert health["status"] == "healthy" and health["service"] == "batch-api" and health["database"] == "connected"
    assert httpx.get(f"{api.base_url}/ready").status_code == 200


def test_a_new_api_key_retires_the_one_it_seeded_before(database, data_dir, db):
    first, second = "sk-rotation-first", "sk-rotation-second"
    try:
        for key in (first, second):
            server = start_api(database, data_dir, "api-rotation", API_KEY=key)
            try:
                assert server.client(key).batches.list() is not None
                if key == second:
                    with pytest.raises(openai.AuthenticationError):
                        server.client(first).batches.list()
                    assert "API_KEY changed" in server.log_path.read_text()
            finally:
                server.stop()
    finally:
        with db.begin() as conn:  # the session's own API seeded API_KEY: it stays the seeded key
            seed_key(conn, API_KEY)
