"""Hostile and absurd input gets a clear OpenAI-shaped 4xx or a line error naming the parameter,
never a 500, a hang or a dropped connection; the server stays healthy and loses nothing it had
accepted."""

from __future__ import annotations

import socket
import time
import urllib.parse

import httpx
import openai
import pytest
import sqlalchemy as sa

from .conftest import API_KEY, start_api
from .jsonl import jsonl, request_line, submit, upload


@pytest.fixture
def accepted(project_client, live_model, db):
    """A batch accepted before the hostile input arrives; checked intact afterwards."""
    batch = submit(project_client, [request_line(f"keep{i}", live_model) for i in range(3)])
    yield batch
    assert project_client.batches.retrieve(batch.id).request_counts.total == 3
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM batch_requests WHERE batch_id = :b AND status = 'queued'"),
                            {"b": batch.id}).scalar() == 3
    project_client.batches.cancel(batch.id)


def assert_healthy(api) -> None:
    health = httpx.get(f"{api.base_url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["database"] == "connected"


@pytest.mark.parametrize(("body", "param"), [
    ({"chat_template": "{% for i in range(10**9) %}x{% endfor %}"}, "body.chat_template"),
    ({"chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}}, "body.chat_template_kwargs.chat_template"),
    ({"chat_template_kwargs": {"tools": [{"type": "function"}]}}, "body.chat_template_kwargs.tools"),
    ({"chat_template_kwargs": {"enable_thinking": {"nested": True}}}, "body.chat_template_kwargs.enable_thinking"),
    ({"chat_template_kwargs": "enable_thinking"}, "body.chat_template_kwargs"),
    ({"n": 129}, "body.n"),
    ({"n": 0}, "body.n"),
    ({"n": True}, "body.n"),
])
def test_a_line_that_would_run_code_or_fan_out_is_refused_naming_its_parameter(
        api, project_client, live_model, accepted, body, param):
    batch = submit(project_client, [request_line("good", live_model), request_line("bad", live_model, **body)])
    assert batch.status == "failed"
    [error] = batch.errors.data
    assert (error.line, error.param) == (2, param) and error.code in ("invalid_value", "invalid_type")
    assert error.message
    assert_healthy(api)


def test_list_valued_inputs_are_capped_but_token_ids_are_one_input(api, project_client, live_model, accepted):
    many = request_line("many", live_model, url="/v1/embeddings", input=[f"text {i}" for i in range(2049)])
    batch = submit(project_client, [many], endpoint="/v1/embeddings")
    assert [(e.line, e.param) for e in batch.errors.data] == [(1, "body.input")]
    assert "2049 items; at most 2048" in batch.errors.data[0].message
    tokens = request_line("tokens", live_model, url="/v1/completions", prompt=list(range(3000)))
    assert submit(project_client, [tokens], endpoint="/v1/completions").status == "validating"
    assert_healthy(api)


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"custom_id": "s", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "M", '
     b'"messages": [{"role": "user", "content": "\\ud800 alone"}]}}', "surrogate"),
    (b'{"custom_id": "n", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "M", '
     b'"temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}}', "NaN is not a JSON value"),
    (b'{"custom_id": "i", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "M", '
     b'"temperature": -Infinity, "messages": [{"role": "user", "content": "hi"}]}}', "-Infinity is not a JSON"),
])
def test_text_json_cannot_hold_is_a_line_error(api, project_client, live_model, accepted, raw, expected):
    batch = submit(project_client, [raw.replace(b'"M"', f'"{live_model}"'.encode())])
    [error] = batch.errors.data
    assert (error.code, error.line) == ("invalid_json_line", 1) and expected in error.message
    assert_healthy(api)


def test_a_paired_surrogate_escape_is_an_ordinary_character(project_client, live_model):
    raw = (b'{"custom_id": "emoji", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "'
           + live_model.encode() + b'", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}}')
    batch = submit(project_client, [raw])
    assert batch.status == "validating"
    project_client.batches.cancel(batch.id)


def test_a_file_without_newlines_is_refused_as_one_long_line(api, project_client, live_model, accepted):
    content = b'{"custom_id": "x", "pad": "' + b"y" * (40 * 1024 * 1024)
    batch = project_client.batches.create(input_file_id=upload(project_client, content).id,
                                          endpoint="/v1/chat/completions", completion_window="24h")
    [error] = batch.errors.data
    assert (error.code, error.line) == ("line_too_long", 1) and f"{len(content)} bytes" in error.message
    assert_healthy(api)


@pytest.mark.parametrize(("window", "seconds"), [("24h", 86400), ("1s", 1), ("720h", 2592000), ("90m", 5400),
                                                  ("43200m", 2592000), ("0s", None), ("0m", None), ("721h", None),
                                                  ("43201m", None), ("999999999999h", None), ("30d", None),
                                                  ("24 h", None)])
def test_completion_window_is_bounded(api, project_client, live_model, window, seconds):
    """Tests allow windows from 1 s (MIN_COMPLETION_WINDOW); the default upper bound is 30 days."""
    file = upload(project_client, jsonl([request_line("w", live_model)]))

    def create():
        return project_client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                             completion_window=window)

    if seconds is not None:
        batch = create()
        project_client.batches.cancel(batch.id)
        assert batch.completion_window == window and batch.expires_at - batch.created_at == seconds
        return
    with pytest.raises(openai.BadRequestError) as caught:
        create()
    assert caught.value.body["param"] == "completion_window" and caught.value.body["code"] == "invalid_value"
    assert_healthy(api)


@pytest.mark.parametrize("priority", [2**31, -(2**31) - 1, 2**40, 10**30])
def test_priority_out_of_range_is_a_400(api, live_model, priority):
    file = upload(api.client(), jsonl([request_line("p", live_model)]))
    answer = httpx.post(f"{api.base_url}/v1/batches", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
                        json={"input_file_id": file.id, "endpoint": "/v1/chat/completions",
                              "completion_window": "24h", "priority": priority})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "priority"
    assert_healthy(api)


@pytest.fixture(scope="module")
def small_upload_api(database, data_dir, tmp_path_factory):
    """An API that accepts files up to 1 MiB and spools, if it ever did, into a temp dir of its own."""
    temp = tmp_path_factory.mktemp("api-tmp")
    server = start_api(database, data_dir, "api-small-uploads", MAX_FILE_BYTES=str(2**20), TMPDIR=str(temp))
    yield server, temp
    server.stop()


def chunked(total: int, piece: int = 64 * 1024):
    """A multipart body sent without Content-Length (chunked), `total` bytes of file content."""
    boundary = "b0undary"
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    for _ in range(total // piece):
        yield b"x" * piece
    yield f"\r\n--{boundary}--\r\n".encode()


def files_named(db, filename: str) -> int:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM files WHERE filename = :f"), {"f": filename}).scalar()


@pytest.mark.parametrize(("key", "status", "code"), [(None, 401, "missing_api_key"),
                                                      (API_KEY, 413, "file_too_large")])
def test_a_chunked_upload_past_the_limit_is_refused_writing_nothing(small_upload_api, db, key, status, code):
    api, temp = small_upload_api
    before = files_named(db, "big.jsonl")
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    answer = httpx.post(f"{api.base_url}/v1/files", content=chunked(3 * 2**20), headers=headers, timeout=60)
    assert answer.status_code == status and answer.json()["error"]["code"] == code
    assert files_named(db, "big.jsonl") == before  # nothing stored
    assert list(temp.iterdir()) == []  # nor spooled
    assert_healthy(api)


def test_a_file_name_in_any_script_is_kept_and_served_back(project_client):
    name = "données-日本.jsonl"
    uploaded = project_client.files.create(file=(name, b'{"a": 1}\n'), purpose="batch")
    assert uploaded.filename == name and project_client.files.retrieve(uploaded.id).filename == name
    own = project_client.files.with_raw_response.content(uploaded.id)
    disposition = own.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="donn') and "filename*=UTF-8''" in disposition
    assert urllib.parse.unquote(disposition.split("filename*=UTF-8''")[1]) == name
    assert own.content == b'{"a": 1}\n'


@pytest.mark.parametrize(("path", "param"), [("/v1/files?purpose=%00", "purpose"), ("/v1/files?limit=1&after=a%00b", "after"),
                                             ("/v1/batches/batch_%00", None), ("/v1/files/file-%00/content", None)])
def test_a_nul_byte_in_a_url_is_a_400(api, path, param):
    answer = httpx.get(f"{api.base_url}{path}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param and answer.json()["error"]["code"] == "invalid_value"
    assert_healthy(api)


def test_a_nul_byte_in_a_batch_field_is_a_400(api, project_client, live_model):
    file = upload(project_client, jsonl([request_line("z", live_model)]))
    for fields in ({"input_file_id": "file-\x00"}, {"metadata": {"k": "a\x00b"}}, {"completion_window": "24h\x00"}):
        body = {"input_file_id": file.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **fields}
        answer = httpx.post(f"{api.base_url}/v1/batches", json=body, timeout=10,
                            headers={"Authorization": f"Bearer {API_KEY}"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == next(iter(fields)), answer.text
    assert_healthy(api)


@pytest.mark.parametrize(("content_type", "body"), [
    ("multipart/form-data; boundary=9cc6", b"--9cc6\r\nFalse--9cc6--\r\n"),  # found by schemathesis
    ("multipart/form-data; boundary=9cc6", b"--9cc6\r\nContent-Disposition: form-data; name=\"file\"; "
                                           b"filename=\"a.jsonl\"\r\n\r\n{}"),  # ends before its body does
    ("application/json", b'{"purpose": "batch"}'),
    ("multipart/form-data", b"no boundary at all"),
])
def test_a_malformed_upload_is_a_400(api, content_type, body):
    answer = httpx.post(f"{api.base_url}/v1/files", content=body, timeout=10,
                        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": content_type})
    assert answer.status_code == 400 and answer.json()["error"]["param"] in ("file", "purpose"), answer.text
    assert_healthy(api)


def test_an_upload_of_endless_small_fields_is_refused(api):
    fields = b"".join(b"--b0undary\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nv\r\n" % i for i in range(40))
    answer = httpx.post(f"{api.base_url}/v1/files", content=fields + b"--b0undary--\r\n", timeout=10,
                        headers={"Authorization": f"Bearer {API_KEY}",
                                 "Content-Type": "multipart/form-data; boundary=b0undary"})
    assert answer.status_code == 400 and "more than 16 form fields" in answer.json()["error"]["message"]
    assert_healthy(api)


def test_slow_uploads_never_take_the_connections_other_calls_need(database, data_dir):
    """With a pool of 2 (4 connections under load) six uploads stall mid-body; the API still
    answers, since at most half the pool serves uploads at once."""
    server = start_api(database, data_dir, "api-slow-uploads", API_DATABASE_POOL="2")
    host, port = urllib.parse.urlsplit(server.base_url).netloc.split(":")
    head = ("--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    stalled = []
    try:
        for _ in range(6):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                         + b"\r\nContent-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: 100000\r\n\r\n"
                         + head + b"{\"custom_id\": ")
            stalled.append(sock)
        time.sleep(1)  # every stalled upload reached the server and waits for more of its body
        listed = httpx.get(f"{server.base_url}/v1/files", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        assert listed.status_code == 200
        for sock in stalled:
            sock.close()
        uploaded = server.client(API_KEY).files.create(file=("after.jsonl", b'{"a": 1}\n'), purpose="batch")
        assert uploaded.bytes == 9
        assert_healthy(server)
    finally:
        for sock in stalled:
            sock.close()
        server.stop()


@pytest.mark.parametrize("seconds", ["²", "9" * 5000, "-1", " 3600"])
def test_an_upload_expiry_that_is_no_small_number_is_a_400(api, seconds):
    answer = httpx.post(f"{api.base_url}/v1/files", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
                        files={"file": ("e.jsonl", b'{"a": 1}\n')},
                        data={"purpose": "batch", "expires_after[anchor]": "created_at",
                              "expires_after[seconds]": seconds})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] in ("expires_after.seconds", "expires_after[seconds]")  # a long field
    assert_healthy(api)


@pytest.mark.parametrize(("seconds", "param"), [
    (b'"\xc2\xb2"', "output_expires_after.seconds"), (b'"' + b"9" * 5000 + b'"', "output_expires_after.seconds"),
    (b"3600.5", "output_expires_after.seconds"),
    (b"9" * 5000, None),  # a number no JSON parser of Python reads: the body as a whole is refused
])
def test_an_output_expiry_that_is_no_small_number_is_a_400(api, live_model, seconds, param):
    file = upload(api.client(), jsonl([request_line("x", live_model)]))
    body = (b'{"input_file_id": "' + file.id.encode() + b'", "endpoint": "/v1/chat/completions", '
            b'"completion_window": "24h", "output_expires_after": {"anchor": "created_at", "seconds": '
            + seconds + b"}}")
    answer = httpx.post(f"{api.base_url}/v1/batches", content=body, timeout=30,
                        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param, answer.text
    assert_healthy(api)


def nested(depth: int) -> bytes:
    """A request line whose body holds a value `depth` levels deep, counting the line itself."""
    head = b'{"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "M", ' \
           b'"messages": [{"role": "user", "content": "hi"}], "metadata": '
    return head + b"[" * (depth - 2) + b"]" * (depth - 2) + b"}}"


@pytest.mark.parametrize("depth", [65, 990, 5000])
def test_a_line_nested_past_the_limit_is_a_line_error(api, project_client, live_model, accepted, depth):
    batch = submit(project_client, [request_line("good", live_model),
                                    nested(depth).replace(b'"M"', f'"{live_model}"'.encode())])
    assert batch.status == "failed"
    [error] = batch.errors.data
    assert (error.code, error.line) == ("invalid_json_line", 2) and "more than 64 levels" in error.message
    assert_healthy(api)


def test_a_line_nested_to_the_limit_is_accepted(project_client, live_model):
    batch = submit(project_client, [nested(64).replace(b'"M"', f'"{live_model}"'.encode())])
    assert batch.status == "validating", batch.errors
    project_client.batches.cancel(batch.id)


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1" * 400 + b".0"])
def test_a_number_past_a_float_is_a_line_error(api, project_client, live_model, accepted, number):
    line = (b'{"custom_id": "big", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "'
            + live_model.encode() + b'", "temperature": ' + number + b', "messages": [{"role": "user", '
            b'"content": "hi"}]}}')
    batch = submit(project_client, [request_line("good", live_model), line])
    [error] = batch.errors.data
    assert (error.code, error.line) == ("invalid_json_line", 2) and "too large" in error.message
    assert_healthy(api)
