"""Files API through the openai SDK against a real server and database."""

from __future__ import annotations

import io

import httpx
import openai
import pytest

from .conftest import start_api
from .jsonl import jsonl, request_line, upload


def test_upload_retrieve_download_list_delete(project_client, live_model):
    content = jsonl([request_line(f"r{i}", live_model) for i in range(3)])
    created = upload(project_client, content, "requests.jsonl")
    assert created.object == "file" and created.purpose == "batch" and created.bytes == len(content)
    assert created.filename == "requests.jsonl" and created.id.startswith("file-")

    assert project_client.files.retrieve(created.id) == created
    assert project_client.files.content(created.id).content == content
    assert [f.id for f in project_client.files.list()] == [created.id]
    assert [f.id for f in project_client.files.list(purpose="batch_output")] == []

    deleted = project_client.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError) as caught:
        project_client.files.retrieve(created.id)
    assert caught.value.body["code"] == "not_found"


def test_large_upload_round_trips_in_chunks(project_client):
    content = b"".join(b'{"x": "%s"}\n' % (b"y" * 1000) for _ in range(10_000))  # ~10 MB, 3 chunks
    created = upload(project_client, content)
    assert created.bytes == len(content)
    assert project_client.files.content(created.id).content == content


@pytest.mark.parametrize(("filename", "purpose", "param"), [
    ("input.csv", "batch", "file"),
    ("input.jsonl", "fine-tune", "purpose"),
])
def test_upload_refuses_wrong_kind(project_client, filename, purpose, param):
    with pytest.raises(openai.BadRequestError) as caught:
        project_client.files.create(file=(filename, io.BytesIO(b"{}\n")), purpose=purpose)
    assert caught.value.body["param"] == param


@pytest.fixture(scope="module")
def small_api(database, data_dir):
    server = start_api(database, data_dir, "api-small", MAX_FILE_BYTES="1000")
    yield server
    server.stop()


def test_oversize_upload_is_413_and_stores_nothing(small_api):
    client = small_api.client()
    before = len(client.files.list().data)
    with pytest.raises(openai.APIStatusError) as caught:
        upload(client, b"x" * 5000 + b"\n")
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "file_too_large"
    assert len(client.files.list().data) == before


def test_oversize_upload_without_declared_length_is_413(small_api):
    """A chunked upload has no Content-Length: the limit is enforced while streaming."""
    def body():
        yield b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n"
        yield b"x" * 5000
        yield b"\r\n--b--\r\n"

    response = httpx.post(f"{small_api.base_url}/v1/files", content=body(),
                          headers={"Authorization": "Bearer sk-test-default-project",
                                   "Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
