"""One policy for what a batch line may ask, checked at ingest whichever engine serves the model:
state a batch cannot honour and media fetched by URL are refused naming the parameter, so such a
line never reaches an engine or a server."""

from __future__ import annotations

import pytest

from .conftest import start_api
from .jsonl import request_line, submit

METADATA_URL = "http://169.254.169.254/latest/meta-data/"
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
         "AAAABJRU5ErkJggg==")


def chat_with(part: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]


def assert_refused(batch, param: str) -> None:
    assert batch.status == "failed"
    [error] = batch.errors.data
    assert (error.code, error.line, error.param) == ("invalid_value", 2, param), error


@pytest.mark.parametrize(("field", "value"), [("background", True), ("previous_response_id", "resp_123"),
                                              ("conversation", "conv_123"), ("store", True), ("stream", True)])
def test_responses_state_a_batch_cannot_keep_is_refused(project_client, live_model, field, value):
    lines = [request_line(name, live_model, url="/v1/responses", input="Hello", **extra)
             for name, extra in (("good", {}), ("bad", {field: value}))]
    assert_refused(submit(project_client, lines, endpoint="/v1/responses"), f"body.{field}")


def test_responses_asking_to_keep_nothing_are_accepted(project_client, live_model):
    line = request_line("r", live_model, url="/v1/responses", input="Hello", store=False, stream=False,
                        background=False, previous_response_id=None)
    batch = submit(project_client, [line], endpoint="/v1/responses")
    assert batch.status == "validating", batch.errors
    project_client.batches.cancel(batch.id)


@pytest.mark.parametrize(("part", "param"), [
    ({"type": "image_url", "image_url": {"url": METADATA_URL}}, "body.messages[0].content[1].image_url"),
    ({"type": "image_url", "image_url": METADATA_URL}, "body.messages[0].content[1].image_url"),
    ({"type": "video_url", "video_url": {"url": "http://10.0.0.1/v.mp4"}}, "body.messages[0].content[1].video_url"),
    ({"type": "audio_url", "audio_url": {"url": "https://[::1]:8000/a.wav"}}, "body.messages[0].content[1].audio_url"),
    ({"type": "input_audio", "input_audio": {"url": "file:///etc/passwd"}}, "body.messages[0].content[1].input_audio"),
    ({"type": "image_url", "image_url": {"url": "images.example.com/cat.png"}},  # no scheme: not http(s)
     "body.messages[0].content[1].image_url"),
])
def test_chat_media_by_url_is_refused(project_client, live_model, part, param):
    lines = [request_line("good", live_model), request_line("bad", live_model, messages=chat_with(part))]
    assert_refused(submit(project_client, lines), param)


def test_responses_input_image_by_url_is_refused(project_client, live_model):
    content = [{"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": METADATA_URL}]
    lines = [request_line("good", live_model, url="/v1/responses", input="Hello"),
             request_line("bad", live_model, url="/v1/responses", input=[{"role": "user", "content": content}])]
    assert_refused(submit(project_client, lines, endpoint="/v1/responses"), "body.input[0].content[1].image_url")


def test_media_as_data_urls_and_plain_audio_are_accepted(project_client, live_model):
    lines = [request_line("image", live_model, messages=chat_with({"type": "image_url", "image_url": {"url": PIXEL}})),
             request_line("audio", live_model, messages=chat_with(
                 {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}))]
    batch = submit(project_client, lines)
    assert batch.status == "validating", batch.errors
    project_client.batches.cancel(batch.id)


def test_hosts_the_operator_allows_may_be_fetched(database, data_dir, live_model):
    server = start_api(database, data_dir, "api-media-hosts",
                       MEDIA_URL_ALLOWED_HOSTS="images.example.com, cdn.example.org")
    try:
        client = server.client()
        allowed = request_line("a", live_model, messages=chat_with(
            {"type": "image_url", "image_url": {"url": "https://Images.Example.com/cat.png"}}))
        batch = submit(client, [allowed])
        assert batch.status == "validating", batch.errors
        client.batches.cancel(batch.id)
        other = request_line("o", live_model, messages=chat_with(
            {"type": "image_url", "image_url": {"url": "https://images.example.com.evil.test/cat.png"}}))
        assert_refused(submit(client, [request_line("good", live_model), other]),
                       "body.messages[0].content[1].image_url")
    finally:
        server.stop()


def test_a_chat_line_may_not_stream(project_client, live_model):
    lines = [request_line("good", live_model), request_line("bad", live_model, stream=True)]
    assert_refused(submit(project_client, lines), "body.stream")


def test_a_media_key_spelled_with_escapes_is_refused_too(project_client, live_model):
    raw = (b'{"custom_id": "escaped", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "'
           + live_model.encode() + b'", "messages": [{"role": "user", "content": [{"type": "image\\u005furl", '
           b'"image\\u005furl": {"url": "http://169.254.169.254/"}}]}]}}')
    assert b"_url" not in raw
    assert_refused(submit(project_client, [request_line("good", live_model), raw]),
                   "body.messages[0].content[0].image_url")
