"""The options of the `openai-http` engine (a pool) that README promises, under the real watchdog,
worker and API: the `round_robin` and `random` strategies spreading requests, the backend states
`http_<status>`, `model_missing`, `timeout` and `connection_error` as the database row and
`batchctl backends` show them (and re-admission), `request_timeout` failing a held request over
to another backend, `BACKEND_API_KEY` sent as the backends' Bearer key, and
`batch_backend_errors_total{backend,error}` on /metrics.

What is proven here is the pool's own behaviour, not a model's answer, so the backends are small
OpenAI-compatible servers of this module (real HTTP on threads of the test process): each names
itself in its answers, counts what it was sent, and is told by the test how to answer its health
checks, its model list and its POSTs. The pool against real vLLM servers is tests/test_pool.py."""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.batch_app.domain import overview
from core.batch_app.domain.statuses import WorkerStatus

from .conftest import Watchdog, batchctl, live_worker, running_watchdog, stack_env, wait_for, wait_for_batch
from .jsonl import request_line, submit
from .receivers import send_json

MODEL = "pool-stub"  # what the backends serve
SERVED = "pool-options"  # what users call it
FAST = {"HEARTBEAT_INTERVAL": "1"}
HOLD_LIMIT = 120.0  # seconds a held request or health check is kept at most (then answered)


class StubBackend:
    """An OpenAI-compatible server on 127.0.0.1: chat completions answered at once with its name as
    the content; `health` ("ok", a status such as "503", "hold": no answer, "close": the connection
    closed with no answer), `models` (what GET /v1/models lists), `faults` (statuses the next POSTs
    are answered with, in order), `hold_posts` (POSTs get no answer) and `key` (GET /v1/* and POSTs
    without `Authorization: Bearer <key>` are refused with a 401, as vLLM's --api-key does) are the
    test's to set at any time."""

    def __init__(self, name: str, key: str = ""):
        self.name, self.key = name, key
        self.health = "ok"
        self.models = [MODEL]
        self.faults: list[str] = []
        self.hold_posts = False
        self.lock = threading.Lock()
        self.answered = 0  # POSTs answered 200
        self.sent_faults: dict[str, int] = {}  # fault statuses sent, by status
        self.held = 0  # POSTs held with no answer
        self.cut = 0  # of those, closed by the client while held
        self.refused: list[tuple[str, str]] = []  # (path, Authorization) of the requests refused for the key
        self.authorizations: list[str] = []  # the Authorization header of every /v1/ request
        self._release = threading.Event()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/health":
                    backend._health(self)
                elif self._authorized() and self.path == "/v1/models":
                    send_json(self, 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in backend.models]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                if self._authorized():
                    backend._post(self, body)

            def _authorized(self) -> bool:
                authorization = self.headers.get("Authorization", "")
                with backend.lock:
                    backend.authorizations.append(authorization)
                    if not backend.key or authorization == f"Bearer {backend.key}":
                        return True
                    backend.refused.append((self.path, authorization))
                send_json(self, 401, {"error": "Unauthorized"})
                return False

            def log_message(self, format: str, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"stub-{name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def _health(self, handler: BaseHTTPRequestHandler) -> None:
        mode = self.health
        if mode == "hold":
            if not _hold(handler, self._release):
                send_json(handler, 200, {})
        elif mode == "close":
            _close(handler)
        elif mode == "ok":
            send_json(handler, 200, {})
        else:
            send_json(handler, int(mode), {"error": {"message": f"{self.name} says {mode}"}})

    def _post(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        with self.lock:
            fault = self.faults.pop(0) if self.faults else None
            if fault:
                self.sent_faults[fault] = self.sent_faults.get(fault, 0) + 1
            elif self.hold_posts:
                self.held += 1
        if fault:
            send_json(handler, int(fault), {"error": {"message": f"injected {fault} by {self.name}", "type": "server_error"}})
            return
        if self.hold_posts:
            if _hold(handler, self._release):
                with self.lock:
                    self.cut += 1
                return
        with self.lock:
            self.answered += 1
        send_json(handler, 200, {
            "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.name}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


def _close(handler: BaseHTTPRequestHandler) -> None:
    handler.close_connection = True
    with contextlib.suppress(OSError):
        handler.connection.shutdown(socket.SHUT_RDWR)


def _hold(handler: BaseHTTPRequestHandler, release: threading.Event) -> bool:
    """Keeps a request unanswered until the client closes its connection (True), the backend stops,
    or HOLD_LIMIT (False: it is then answered)."""
    for _ in range(int(HOLD_LIMIT / 0.05)):
        if release.wait(0.05):
            return False
        if select.select([handler.connection], [], [], 0)[0]:
            try:
                if not handler.connection.recv(1, socket.MSG_PEEK):
                    handler.close_connection = True
                    return True
            except OSError:
                handler.close_connection = True
                return True
    return False


@contextlib.contextmanager
def stub_backends(count: int, key: str = ""):
    started = [StubBackend(f"backend-{i}", key) for i in range(count)]
    try:
        yield started
    finally:
        for backend in started:
            backend.stop()


def pool_slot(urls: list[str], **options) -> dict:
    return {"slot": "pool-0", "engine": "openai-http", "model": MODEL, "served_name": SERVED, "backends": urls,
            "health_interval": 1, "max_in_flight_per_backend": 64, **options}


def backend_rows(db, slot: str = "pool-0") -> dict[str, object]:
    with db.connect() as conn:
        return {row.url: row for row in overview.backends(conn) if row.slot == slot}


def chat_lines(count: int, model: str = SERVED) -> list[dict]:
    return [request_line(f"r{i}", model, max_tokens=8) for i in range(count)]


def answered_by(client, batch, count: int, model: str = SERVED) -> dict[str, int]:
    """{backend name: lines it answered} of a batch whose every request succeeded, each custom_id once."""
    assert batch.status == "completed" and batch.request_counts.completed == count, batch
    assert batch.error_file_id is None
    found = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in found) == sorted(f"r{i}" for i in range(count))
    assert {line["response"]["status_code"] for line in found} == {200}
    assert {line["response"]["body"]["model"] for line in found} == {model}
    names: dict[str, int] = {}
    for line in found:
        name = line["response"]["body"]["choices"][0]["message"]["content"]
        names[name] = names.get(name, 0) + 1
    return names


def run_batch(client, count: int, model: str = SERVED):
    return wait_for_batch(client, submit(client, chat_lines(count, model)).id, 120)


def metric_samples(api, name: str) -> dict[tuple, float]:
    """{sorted label items: value} of one metric on the API's /metrics."""
    text = httpx.get(f"{api.base_url}/metrics", timeout=10).text
    return {tuple(sorted(sample.labels.items())): sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


def backends_listing(watchdog, url: str) -> str:
    """The row of `batchctl backends` for one backend."""
    listed = batchctl(watchdog.env, "backends")
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if url in line]
    return row


def worker_log(watchdog, slot: str = "pool-0") -> str:
    return (watchdog.log_dir / f"worker-{slot}.log").read_text(errors="replace")


def test_round_robin_sends_each_backend_its_turn_so_they_answer_equal_shares(database, data_dir, db, client):
    """With every backend healthy and room on each, `round_robin` takes them in turn: 160 requests
    over 8 backends are 20 on each, exactly (the order of arrival cannot change the count)."""
    with stub_backends(8) as stubs, \
            running_watchdog(database, data_dir, "watchdog-pool-round-robin",
                             [pool_slot([s.url for s in stubs], strategy="round_robin")], **FAST):
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        names = answered_by(client, run_batch(client, 160), 160)
        assert names == {s.name: 20 for s in stubs}
        assert [s.answered for s in stubs] == [20] * 8
        wait_for(lambda: [r.completed for r in backend_rows(db).values()] == [20] * 8, 10,
                 message="each backend's 20 answers counted by the heartbeat")


def test_random_spreads_requests_over_every_backend_without_taking_them_in_turn(database, data_dir, db, client):
    """`random` draws a backend for each request: over 160 requests each of 8 backends gets some
    (all but one missing it: 8 * (7/8)^160, about 4e-9), and the shares are not the 20 each that
    taking turns gives (about 1e-7 at random)."""
    with stub_backends(8) as stubs, \
            running_watchdog(database, data_dir, "watchdog-pool-random",
                             [pool_slot([s.url for s in stubs], strategy="random")], **FAST):
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        names = answered_by(client, run_batch(client, 160), 160)
        assert set(names) == {s.name for s in stubs} and sum(names.values()) == 160, names
        assert sorted(names.values()) != [20] * 8, names
        assert [s.answered for s in stubs] == [names[s.name] for s in stubs]
        wait_for(lambda: {url: r.completed for url, r in backend_rows(db).items()}
                 == {s.url: s.answered for s in stubs}, 10, message="the answers counted by the heartbeat")


def test_each_unhealthy_state_is_shown_takes_the_backend_out_of_rotation_and_a_passed_check_readmits_it(
        database, data_dir, db, client):
    """A backend answering its health check with a 503, listing another model, not answering it
    within the health check's 5 s, or closing the connection is `http_503`, `model_missing`,
    `timeout` or `connection_error` in its row and in `batchctl backends`, with the reason as its
    last error; meanwhile a batch runs on the other backend alone; it is healthy again once a
    check passes."""
    states = [("503", None, "http_503", "HTTP 503: GET /health"),
              ("ok", ["another-model"], "model_missing", f"it serves another-model, not {MODEL}"),
              ("hold", None, "timeout", "no answer to GET /health within 5 s"),
              ("close", None, "connection_error", "")]
    with stub_backends(2) as (sick, well), \
            running_watchdog(database, data_dir, "watchdog-pool-states", [pool_slot([sick.url, well.url])],
                             **FAST) as watchdog:
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        for health, models, state, reason in states:
            sick.health, sick.models = health, models or [MODEL]
            row = wait_for(lambda: (r := backend_rows(db).get(sick.url)) and r.state == state and r, 30,
                           message=f"the backend {state}")
            assert reason in row.last_error, (state, row.last_error)
            assert backend_rows(db)[well.url].state == "healthy"
            listed = backends_listing(watchdog, sick.url)
            assert f" {state} " in listed and "pool-0" in listed, listed
            answered = sick.answered
            assert answered_by(client, run_batch(client, 6), 6) == {well.name: 6}, state
            assert sick.answered == answered
            sick.health, sick.models = "ok", [MODEL]
            wait_for(lambda: backend_rows(db)[sick.url].state == "healthy", 30, message=f"re-admitted after {state}")
            assert " healthy " in backends_listing(watchdog, sick.url)
        assert "is healthy again: re-admitted" in worker_log(watchdog)


def test_a_request_held_past_request_timeout_is_that_backends_timeout_and_is_answered_by_another(
        database, data_dir, db, client, api):
    """`request_timeout`: a backend that holds requests without answering has each cut (the pool
    closes the connection) after that many seconds, counted as its timeout, and the request is
    answered by the other backend; nothing fails."""
    with stub_backends(2) as (silent, answering), \
            running_watchdog(database, data_dir, "watchdog-pool-request-timeout",
                             [pool_slot([silent.url, answering.url], request_timeout=2)], **FAST) as watchdog:
        silent.hold_posts = True
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        assert answered_by(client, run_batch(client, 20), 20) == {answering.name: 20}
        assert silent.held > 0 and silent.answered == 0
        wait_for(lambda: silent.cut == silent.held, 10, message="every held request cut by the pool")
        row = wait_for(lambda: (r := backend_rows(db)[silent.url]).errors and r, 10, message="timeouts counted")
        assert row.errors == {"TimeoutError": silent.held}
        assert "no answer to POST /v1/chat/completions within 2 s" in row.last_error
        log = worker_log(watchdog)
        assert f"backend {silent.url} is timeout: " in log
        failures = [line for line in log.splitlines() if f"backend {silent.url} failed request" in line]
        assert len(failures) == silent.held
        assert all(re.search(r"\(custom_id r\d+\), try \d of 4: TimeoutError: no answer to POST", line)
                   for line in failures), failures[:3]
        errors = metric_samples(api, "batch_backend_errors_total")
        assert errors[(("backend", silent.url), ("error", "TimeoutError"))] == silent.held
        assert not [labels for labels in errors if ("backend", answering.url) in labels]


def test_backend_errors_are_counted_on_metrics_by_backend_and_error_type(database, data_dir, db, client, api):
    """`batch_backend_errors_total{backend,error}` counts every failed try: a backend that answers
    two POSTs with a 500 and one with a 429 is counted 2 `HTTP 500` and 1 `HTTP 429`, as
    `batchctl backends` says too; the requests are all answered on later tries."""
    with stub_backends(1) as (flaky,), \
            running_watchdog(database, data_dir, "watchdog-pool-errors", [pool_slot([flaky.url])], **FAST) as watchdog:
        flaky.faults = ["500", "429", "500"]
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        assert answered_by(client, run_batch(client, 10), 10) == {flaky.name: 10}
        assert flaky.sent_faults == {"500": 2, "429": 1}
        wait_for(lambda: backend_rows(db)[flaky.url].errors == {"HTTP 500": 2, "HTTP 429": 1}, 10,
                 message="the failed tries reported")
        errors = metric_samples(api, "batch_backend_errors_total")
        mine = {labels: value for labels, value in errors.items() if ("backend", flaky.url) in labels}
        assert mine == {(("backend", flaky.url), ("error", "HTTP 500")): 2.0,
                        (("backend", flaky.url), ("error", "HTTP 429")): 1.0}
        assert "HTTP 429 1, HTTP 500 2" in backends_listing(watchdog, flaky.url)


def test_backend_api_key_is_the_bearer_key_of_every_request_to_backends_that_refuse_requests_without_it(
        database, data_dir, db, client):
    """BACKENDS alone: without BACKEND_API_KEY, backends that expect a key refuse the model list and
    the watchdog waits, running no pool worker; with it, every request of theirs that needs it (the
    model list, at start and at each health check, and the batch's requests) carries it as a Bearer
    key and the batch completes."""
    key = "sk-backend-secret"
    with stub_backends(2, key=key) as stubs:
        for stub in stubs:
            stub.models = ["pool-keyed"]
        urls = ",".join(s.url for s in stubs)
        keyless = Watchdog(stack_env(database, data_dir, "watchdog-pool-no-key", WORKERS="", BACKENDS=urls, **FAST))
        try:
            wait_for(lambda: "no backend of BACKENDS lists its models yet"
                     in (keyless.log_dir / "watchdog.log").read_text(errors="replace"), 60,
                     message="the watchdog refused the model list")
            assert all(("/v1/models", "") in s.refused for s in stubs)
            assert live_worker(db, "pool-pool-keyed", statuses=[status.value for status in WorkerStatus]) is None
        finally:
            keyless.stop()
        refused = [len(s.refused) for s in stubs]
        for stub in stubs:
            stub.authorizations.clear()
        keyed = Watchdog(stack_env(database, data_dir, "watchdog-pool-key", WORKERS="", BACKENDS=urls,
                                   BACKEND_API_KEY=key, **FAST))
        try:
            wait_for(lambda: live_worker(db, "pool-pool-keyed"), 60, message="pool worker up")
            names = answered_by(client, run_batch(client, 20, "pool-keyed"), 20, "pool-keyed")
            assert sum(names.values()) == 20
        finally:
            stopped = keyed.stop()
        assert stopped == 0
        assert [len(s.refused) for s in stubs] == refused
        for stub in stubs:
            assert stub.authorizations and set(stub.authorizations) == {f"Bearer {key}"}


def test_without_its_key_a_backend_of_a_workers_pool_is_http_401_and_creating_a_batch_is_refused(
        database, data_dir, db, client):
    """The refusal as the pool sees it: a backend expecting a key the slot does not give fails its
    checks as `http_401`, so no backend serves the model and a batch for it is refused with a 503."""
    with stub_backends(1, key="sk-backend-secret") as (locked,), \
            running_watchdog(database, data_dir, "watchdog-pool-401", [pool_slot([locked.url])], **FAST):
        wait_for(lambda: live_worker(db, "pool-0", statuses=("no_backend",)), 60, message="no backend")
        wait_for(lambda: (r := backend_rows(db).get(locked.url)) and r.state == "http_401", 30, message="http_401")
        assert locked.refused and {auth for _, auth in locked.refused} == {""}
        with pytest.raises(openai.InternalServerError) as refused:
            submit(client, chat_lines(1))
        assert refused.value.status_code == 503 and "No backend serving model" in str(refused.value)
