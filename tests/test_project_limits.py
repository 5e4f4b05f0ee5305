"""Per-project limits: each reached gives a 429 naming it, and another project, beside one at
its limit, creates as before."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest
import sqlalchemy as sa

from core.batch_app.domain import limits
from core.batch_app.domain.keys import create_key

from .conftest import start_api
from .jsonl import jsonl, request_line, upload

LIMITS = {"PROJECT_MAX_FILES": "4", "PROJECT_MAX_FILE_BYTES": "20000", "PROJECT_MAX_ACTIVE_BATCHES": "2",
          "PROJECT_MAX_ACTIVE_REQUESTS": "5"}


@pytest.fixture(scope="module")
def limited_api(database, data_dir):
    server = start_api(database, data_dir, "api-limits", **LIMITS)
    yield server
    server.stop()


@pytest.fixture
def two_projects(limited_api, db):
    """Clients of two new projects: the one that reaches a limit, and its neighbour."""
    with db.begin() as conn:
        keys = [create_key(conn, f"limits-{uuid.uuid4().hex[:8]}") for _ in range(2)]
    return [limited_api.client(key) for key in keys]


def refused(call, code: str) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        call()
    error = caught.value.body
    assert error["code"] == code and code.upper() in error["message"], error


def create(client, file_id: str):
    return client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")


def test_files_stored(two_projects):
    project, neighbour = two_projects
    files = [upload(project, b'{"a": 1}\n') for _ in range(4)]
    refused(lambda: upload(project, b'{"a": 1}\n'), "project_max_files")
    assert upload(neighbour, b'{"a": 1}\n').bytes == 9
    project.files.delete(files[0].id)
    assert upload(project, b'{"a": 1}\n').bytes == 9  # room again


def test_bytes_stored_and_nothing_of_a_refused_upload_is_kept(two_projects, db):
    project, neighbour = two_projects
    upload(project, b"x" * 12_000)
    refused(lambda: upload(project, b"y" * 9_000, filename="over.jsonl"), "project_max_file_bytes")
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM files WHERE filename = 'over.jsonl'")).scalar() == 0
    assert upload(neighbour, b"y" * 12_000).bytes == 12_000
    assert upload(project, b"z" * 8_000).bytes == 8_000  # what fits is taken


def test_unfinished_batches(two_projects, own_model):
    project, neighbour = two_projects
    file = upload(project, jsonl([request_line("a", own_model)]))
    first, _ = create(project, file.id), create(project, file.id)
    refused(lambda: create(project, file.id), "project_max_active_batches")
    assert create(neighbour, upload(neighbour, jsonl([request_line("b", own_model)])).id).status == "validating"
    project.batches.cancel(first.id)
    assert create(project, file.id).status == "validating"  # a finished batch no longer counts


def test_requests_of_unfinished_batches(two_projects, own_model):
    project, neighbour = two_projects
    four = jsonl([request_line(f"r{i}", own_model) for i in range(4)])
    assert create(project, upload(project, four).id).request_counts.total == 4
    refused(lambda: create(project, upload(project, jsonl([request_line(f"s{i}", own_model) for i in range(2)])).id),
            "project_max_active_requests")
    assert create(neighbour, upload(neighbour, four).id).request_counts.total == 4
    assert create(project, upload(project, jsonl([request_line("t", own_model)])).id).request_counts.total == 1


def test_a_project_busy_at_its_limits_holds_up_no_other(limited_api, db, own_model):
    """While one project's creates hold its limit locks, another project's creates go through;
    they would wait for ever on a lock shared between projects."""
    busy, other = f"limits-{uuid.uuid4().hex[:8]}", f"limits-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        busy_key, other_key = create_key(conn, busy), create_key(conn, other)
    neighbour = limited_api.client(other_key).with_options(timeout=30)
    with db.begin() as conn:
        limits.lock(conn, "files", busy)
        limits.lock(conn, "batches", busy)
        file = upload(neighbour, jsonl([request_line("n", own_model)]))
        assert create(neighbour, file.id).status == "validating"
        with pytest.raises(httpx.ReadTimeout):  # the busy project's own upload waits for its lock
            httpx.post(f"{limited_api.base_url}/v1/files", headers={"Authorization": f"Bearer {busy_key}"},
                       files={"file": ("w.jsonl", b'{"a": 1}\n')}, data={"purpose": "batch"}, timeout=3)
