"""What a pool sends its backends and takes from them: an answer past BACKEND_MAX_REPLY_BYTES is
read no further and is that line's error, while the other lines of the batch are answered as
usual; an in-process engine's answer past it is not stored either; a Responses line asks the
server to store nothing."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import echo_slot, free_port, live_worker, running_watchdog, wait_for, wait_for_batch
from .jsonl import request_line, submit
from .receivers import send_json

MODEL = "reply-size-model"
LIMIT = 1024 * 1024


class Backend(BaseHTTPRequestHandler):
    """An OpenAI-compatible server whose answer to a message saying `huge` is 3 MiB of text, sent
    chunked (no Content-Length), so only reading it tells how long it is."""

    protocol_version = "HTTP/1.1"
    posts: list[dict] = []

    def do_GET(self) -> None:
        send_json(self, 200, {"data": [{"id": MODEL, "object": "model"}]} if self.path == "/v1/models" else {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.posts.append(body)
        text = "x" * (3 * LIMIT) if "huge" in json.dumps(body.get("messages")) else "fine"
        answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(data), 64 * 1024):
            piece = data[start:start + 64 * 1024]
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            except OSError:
                return  # the pool stopped reading
        self.wfile.write(b"0\r\n\r\n")


    def log_message(self, *args) -> None:
        pass


SLOT = {"slot": "pool-replies", "engine": "openai-http", "model": MODEL, "health_interval": 1}


@pytest.fixture
def backend():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_answer_past_the_limit_is_that_lines_error(database, data_dir, db, client, backend):
    with running_watchdog(database, data_dir, "watchdog-replies", [{**SLOT, "backends": [backend]}],
                          HEARTBEAT_INTERVAL="1", BACKEND_MAX_REPLY_BYTES=str(LIMIT)):
        wait_for(lambda: live_worker(db, "pool-replies"), 60, message="pool worker up")
        huge = [{"role": "user", "content": "huge"}]
        lines = [request_line("small", MODEL), request_line("big", MODEL, messages=huge), request_line("after", MODEL)]
        done = wait_for_batch(client, submit(client, lines).id, 120)
        assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
        [error] = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
        assert error["custom_id"] == "big"
        body = error["response"]["body"] if error["response"] else error["error"]
        assert "response_too_large" in json.dumps(body) and "BACKEND_MAX_REPLY_BYTES" in json.dumps(body)
        assert live_worker(db, "pool-replies") is not None  # the worker goes on


def test_an_in_process_answer_past_the_limit_is_that_lines_error(database, data_dir, db, client):
    slot = "reply-size-echo"
    with running_watchdog(database, data_dir, "watchdog-reply-size", [echo_slot(slot)],
                          BACKEND_MAX_REPLY_BYTES=str(LIMIT)):
        wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        lines = [request_line("small", slot), request_line("big", slot, messages=[{"role": "user", "content": "x" * LIMIT}])]
        done = wait_for_batch(client, submit(client, lines).id, 120)
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    [error] = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert error["custom_id"] == "big" and error["response"]["status_code"] == 502
    assert error["response"]["body"]["error"]["code"] == "response_too_large"


def test_a_responses_line_asks_its_server_to_store_nothing(database, data_dir, db, client, backend):
    Backend.posts.clear()
    with running_watchdog(database, data_dir, "watchdog-replies", [{**SLOT, "backends": [backend]}],
                          HEARTBEAT_INTERVAL="1"):
        wait_for(lambda: live_worker(db, "pool-replies"), 60, message="pool worker up")
        line = request_line("r", MODEL, url="/v1/responses", input="Hello")
        done = wait_for_batch(client, submit(client, [line], endpoint="/v1/responses").id, 120)
        assert done.request_counts.completed == 1
        assert [post["store"] for post in Backend.posts] == [False]
