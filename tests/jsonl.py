"""Building batch input files for tests."""

from __future__ import annotations

import io
import json

# A JSON schema whose grammar leaves no room for whitespace: guided by it, even the demo model's
# random weights must stop within a few tokens (an object's grammar lets them emit spaces until
# max_tokens), so what a test reads is always a finished, schema-valid answer.
CLOSED_SCHEMA = {"type": "string", "enum": ["yes", "no"]}


def request_line(custom_id: str, model: str, url: str = "/v1/chat/completions", **body) -> dict:
    if url == "/v1/chat/completions":
        body.setdefault("messages", [{"role": "user", "content": f"Say something about {custom_id}."}])
    elif url == "/v1/completions":
        body.setdefault("prompt", f"Once upon a time {custom_id}")
    else:
        body.setdefault("input", f"text {custom_id}")
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": model, **body}}


def jsonl(lines: list) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def upload(client, content: bytes, filename: str = "input.jsonl"):
    return client.files.create(file=(filename, io.BytesIO(content)), purpose="batch")


def submit(client, lines: list, endpoint: str = "/v1/chat/completions", **kwargs):
    file = upload(client, jsonl(lines))
    return client.batches.create(input_file_id=file.id, endpoint=endpoint,
                                 completion_window=kwargs.pop("completion_window", "24h"), **kwargs)
