"""Keys, project isolation, and OpenAI's error shape on every failure."""

from __future__ import annotations

import httpx
import openai
import pytest

from core.batch_app.database import open_database
from core.batch_app.domain.keys import create_key, list_keys

from .conftest import API_KEY, batchctl, scratch_database, start_api
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


def test_a_new_api_key_retires_the_one_it_seeded_before_for_good(database, data_dir):
    first, second = "sk-rotation-first", "sk-rotation-second"
    with scratch_database(database) as url:
        for key in (first, second):
            start_api(url, data_dir, "api-rotation", API_KEY=key).stop()
        server = start_api(url, data_dir, "api-rotation", API_KEY=second)
        try:
            assert server.client(second).batches.list() is not None
            with pytest.raises(openai.AuthenticationError):
                server.client(first).batches.list()
            assert "API_KEY changed" in server.log_path.read_text()
        finally:
            server.stop()
        server = start_api(url, data_dir, "api-rotation", API_KEY=first)  # back to the retired key
        try:
            with pytest.raises(openai.AuthenticationError, match="revoked"):
                server.client(first).batches.list()
            assert server.client(second).batches.list() is not None  # the live key is kept
            assert "API_KEY is a revoked key: it stays refused" in server.log_path.read_text()
        finally:
            server.stop()


def status(server, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{server.base_url}/v1/batches", headers=headers, timeout=10).status_code


def test_every_key_revoked_leaves_the_api_closed_across_restarts(database, data_dir):
    seeded = "sk-last-key-seeded"
    with scratch_database(database) as url:
        server = start_api(url, data_dir, "api-last-key", API_KEY=seeded)
        try:
            scratch = open_database(url, pool_size=1)
            with scratch.begin() as conn:
                other = create_key(conn, "research")
            assert status(server, seeded) == status(server, other) == 200 and status(server, None) == 401
            env = dict(server.env, DATABASE_URL=url)
            with scratch.connect() as conn:
                ids = [row.id for row in list_keys(conn)]
            assert len(ids) == 2
            for key_id in ids:
                assert batchctl(env, "keys", "revoke", str(key_id)).returncode == 0
            assert "no live API keys" in batchctl(env, "keys", "list").stdout
            assert {status(server, key) for key in (seeded, other, None, "sk-anything")} == {401}
            server.stop()
            server = start_api(url, data_dir, "api-last-key", API_KEY=seeded)  # seeds the revoked key again
            assert {status(server, key) for key in (seeded, other, None, "sk-anything")} == {401}
            assert "API_KEY is a revoked key" in server.log_path.read_text()
            scratch.dispose()
        finally:
            server.stop()


def test_open_access_is_a_setting_announced_at_start(database, data_dir):
    with scratch_database(database) as url:
        server = start_api(url, data_dir, "api-open", API_KEY="", OPEN_ACCESS="true")
        try:
            assert status(server, None) == status(server, "sk-anything") == 200
            assert "OPEN_ACCESS is on" in server.log_path.read_text()
        finally:
            server.stop()
        server = start_api(url, data_dir, "api-closed", API_KEY="")  # no key at all, and not open
        try:
            assert status(server, None) == status(server, "sk-anything") == 401
            assert "every request is refused (401)" in server.log_path.read_text()
        finally:
            server.stop()
