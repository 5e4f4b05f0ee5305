"""The product end to end with the real vLLM engine: the openai SDK uploads batches to a real API
server; a real watchdog runs real vLLM workers (two chat workers on the demo model and one
embedding worker) on a real PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import sqlalchemy as sa
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from .conftest import live_worker, log_lines, rerun, restarts, start_watchdog, wait_for, wait_for_batch
from .jsonl import CLOSED_SCHEMA, request_line, submit

pytestmark = pytest.mark.vllm

CHAT_MODEL, EMBED_MODEL = "demo-tiny-llama", "all-MiniLM-L6-v2"


# A small window per chat worker, so that both take part in batches of a few hundred requests.
VLLM_SLOTS = [{"slot": "chat-0", "model": "demo", "max_in_flight": 64},
              {"slot": "chat-1", "model": "demo", "max_in_flight": 64},
              {"slot": "embed-0", "model": "all-MiniLM-L6-v2"}]


@pytest.fixture(scope="module")
def vllm_stack(database, data_dir, db, api):
    """The real product on the test database: a watchdog running two vLLM chat workers on the demo
    model and one embedding worker, shared by this module's tests."""
    watchdog = start_watchdog(database, data_dir, "watchdog-vllm", VLLM_SLOTS, HEARTBEAT_INTERVAL="1",
                              RESTART_BACKOFF_MIN="0.5", SHUTDOWN_GRACE="20")
    try:
        for slot in VLLM_SLOTS:
            wait_for(lambda: live_worker(db, slot["slot"]), 600, interval=1, message=f"{slot['slot']} loaded")
        yield watchdog
    finally:
        watchdog.stop()


def read_lines(client, file_id) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()] if file_id else []


def all_lines(client, batch) -> list[dict]:
    return read_lines(client, batch.output_file_id) + read_lines(client, batch.error_file_id)


def assert_each_once(client, batch, custom_ids: set[str]) -> None:
    seen = [line["custom_id"] for line in all_lines(client, batch)]
    assert len(seen) == len(set(seen)), "a custom_id appears twice"
    assert set(seen) == custom_ids


@pytest.mark.parametrize(("endpoint", "model", "body_type"), [
    ("/v1/chat/completions", CHAT_MODEL, ChatCompletion),
    ("/v1/completions", CHAT_MODEL, Completion),
    ("/v1/embeddings", EMBED_MODEL, CreateEmbeddingResponse),
])
def test_each_endpoint_gives_well_formed_output(vllm_stack, client, endpoint, model, body_type):
    lines = [request_line(f"r{i}", model, url=endpoint, **({} if "embed" in endpoint else {"max_tokens": 8}))
             for i in range(30)]
    done = wait_for_batch(client, submit(client, lines, endpoint=endpoint).id)
    assert done.status == "completed" and done.request_counts.completed == 30
    assert done.usage.input_tokens > 0
    assert_each_once(client, done, {f"r{i}" for i in range(30)})
    for line in read_lines(client, done.output_file_id):
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        body = body_type.model_validate(line["response"]["body"])
        assert body.model == model and body.usage.prompt_tokens > 0
    if "embed" in endpoint:
        assert len(body.data[0].embedding) == 384
    else:
        assert done.usage.output_tokens > 0


def test_a_responses_batch_answers_response_objects_and_counts_usage(vllm_stack, client):
    lines = [request_line(f"r{i}", CHAT_MODEL, url="/v1/responses", max_output_tokens=8, temperature=0)
             for i in range(20)]
    lines.append(request_line("shaped", CHAT_MODEL, url="/v1/responses", max_output_tokens=40, temperature=0,
                              text={"format": {"type": "json_schema", "name": "a", "schema": CLOSED_SCHEMA}}))
    lines.append(request_line("tools", CHAT_MODEL, url="/v1/responses", tools=[{"type": "function", "name": "f"}]))
    done = wait_for_batch(client, submit(client, lines, endpoint="/v1/responses").id)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 21, 1)
    outputs = {line["custom_id"]: line for line in all_lines(client, done)}
    for custom_id, line in outputs.items():
        if custom_id == "tools":
            assert line["response"]["status_code"] == 400
            assert line["response"]["body"]["error"]["param"] == "tools"
            continue
        response = Response.model_validate(line["response"]["body"])
        assert response.model == CHAT_MODEL and response.usage.output_tokens > 0
    shaped = Response.model_validate(outputs["shaped"]["response"]["body"])
    assert shaped.status == "completed" and json.loads(shaped.output_text) in ("yes", "no")
    assert done.usage.input_tokens > 0 and done.usage.output_tokens >= 20


def test_a_bad_request_becomes_one_error_line(vllm_stack, client):
    lines = [request_line(f"ok{i}", CHAT_MODEL, max_tokens=4) for i in range(5)]
    lines.insert(2, request_line("too-long", CHAT_MODEL, messages=[{"role": "user", "content": "word " * 3000}]))
    lines.insert(4, request_line("bad-param", CHAT_MODEL, temperature="hot"))
    done = wait_for_batch(client, submit(client, lines).id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 2)
    errors = {line["custom_id"]: line for line in read_lines(client, done.error_file_id)}
    assert set(errors) == {"too-long", "bad-param"}
    for line in errors.values():
        assert line["response"]["status_code"] == 400
        assert line["response"]["body"]["error"]["message"]


def test_two_workers_share_a_batch_without_duplicates_or_gaps(vllm_stack, client, db):
    lines = [request_line(f"r{i}", CHAT_MODEL, max_tokens=16) for i in range(500)]
    done = wait_for_batch(client, submit(client, lines).id)
    assert done.status == "completed" and done.request_counts.completed == 500
    assert_each_once(client, done, {f"r{i}" for i in range(500)})
    with db.connect() as conn:
        slots = conn.execute(sa.text("SELECT DISTINCT w.slot FROM batch_requests r JOIN workers w ON w.id = r.worker_id "
                                     "WHERE r.batch_id = :b"), {"b": done.id}).scalars().all()
    assert set(slots) == {"chat-0", "chat-1"}


def running_batch(client, db, count: int, max_tokens: int = 64):
    batch = submit(client, [request_line(f"r{i}", CHAT_MODEL, max_tokens=max_tokens) for i in range(count)])
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed > 20, 300, message="progress")
    return batch


def holds_while_more_waits(db, batch_id: str, worker_id) -> bool:
    with db.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FILTER (WHERE status = 'running' AND worker_id = :w) > 0 "
            "AND count(*) FILTER (WHERE status = 'queued') > 0 FROM batch_requests WHERE batch_id = :b"),
            {"b": batch_id, "w": worker_id}).scalar()


def test_sigkill_mid_batch_loses_and_duplicates_nothing(vllm_stack, client, db):
    for slot in ("chat-0", "chat-1"):
        wait_for(lambda: live_worker(db, slot), 600, interval=1, message=f"{slot} serving")
    victim = live_worker(db, "chat-0")
    batch = submit(client, [request_line(f"r{i}", CHAT_MODEL, max_tokens=64) for i in range(400)])
    # Killed while it holds some of the batch and more waits (so it keeps claiming until the kill).
    wait_for(lambda: holds_while_more_waits(db, batch.id, victim.id), 300, interval=0.05,
             message="chat-0 holding requests of the batch")
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    replacement = wait_for(lambda: (w := live_worker(db, "chat-0")) and w.pid != victim.pid and w, 600,
                           interval=0.2, message="replacement worker")
    print(f"\nkill -> replacement serving: {time.monotonic() - killed_at:.1f} s")
    done = wait_for_batch(client, batch.id, 600)
    assert done.status == "completed" and done.request_counts.completed == 400
    assert_each_once(client, done, {f"r{i}" for i in range(400)})
    assert rerun(db, batch.id)  # the victim held requests, and they ran again (once: above)
    # The replacement takes its share of the next batch: more lines than one worker holds at once.
    after = wait_for_batch(client, submit(client, [request_line(f"n{i}", CHAT_MODEL, max_tokens=16)
                                                   for i in range(200)]).id, 300)
    assert after.status == "completed" and after.request_counts.completed == 200
    with db.connect() as conn:
        served = conn.execute(sa.text("SELECT count(*) FROM batch_requests WHERE batch_id = :b AND worker_id = :w"),
                              {"b": after.id, "w": replacement.id}).scalar()
    assert served > 0


def test_sigterm_drains_a_worker_and_loses_nothing(vllm_stack, client, db):
    wait_for(lambda: live_worker(db, "chat-1"), 600, interval=1, message="chat-1 serving")
    batch = running_batch(client, db, 300)
    worker = live_worker(db, "chat-1")
    os.kill(worker.pid, signal.SIGTERM)
    done = wait_for_batch(client, batch.id, 600)
    assert done.status == "completed" and done.request_counts.completed == 300
    assert_each_once(client, done, {f"r{i}" for i in range(300)})
    # Its own last answers may be what ended the batch: it marks itself stopped just after them.
    row = wait_for(lambda: (r := worker_row(db, worker.id)).status == "stopped" and r, 30, message="chat-1 stopped")
    with db.connect() as conn:
        running = conn.execute(sa.text("SELECT count(*) FROM batch_requests WHERE worker_id = :w AND status = 'running'"),
                               {"w": worker.id}).scalar()
    assert row.stopped_at is not None and running == 0


def test_a_worker_stopped_while_vllm_loads_its_model_stops_at_once_uncharged(vllm_stack, db):
    """It holds nothing yet, so it does not finish a load (minutes for a large model) before it stops."""
    current = wait_for(lambda: live_worker(db, "chat-1", statuses=("loading", "idle", "busy")), 60,
                       message="a chat-1 process")
    charged = len(restarts(db, "chat-1"))
    if current.status == "loading":  # started again after the drain test, say
        loading = current
    else:
        os.kill(current.pid, signal.SIGTERM)  # stopped (at once, or drained) and started again, uncharged
        loading = wait_for(lambda: (w := live_worker(db, "chat-1", statuses=("loading",))) and w.id != current.id
                           and w, 120, interval=0.1, message="chat-1 started again and loading")
    os.kill(loading.pid, signal.SIGTERM)
    wait_for(lambda: worker_row(db, loading.id).status == "stopped", 15, message="stopped while loading")
    log = (vllm_stack.log_dir / "worker-chat-1.log").read_text(errors="replace")
    own = [line for line in log.splitlines() if f"worker:chat-1[{loading.pid}]" in line]
    # "while loading the model: stopping at once", or the runner's line when the signal came just before
    # the load began (caught as the load starts).
    assert any("received SIGTERM" in line for line in own), own[-5:]
    assert any("stopped before serving" in line for line in own)
    assert not any(f"model {CHAT_MODEL} loaded in" in line for line in own)
    # Started again (a restart is charged, or not, when the watchdog starts the next process).
    wait_for(lambda: (w := live_worker(db, "chat-1", statuses=("loading", "idle", "busy"))) and w.id != loading.id,
             60, interval=0.1, message="chat-1 started again")
    assert len(restarts(db, "chat-1")) == charged


def worker_row(db, worker_id):
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT status, stopped_at FROM workers WHERE id = :w"), {"w": worker_id}).first()


def dropped_since(log_path, offset: int) -> int:
    """How many requests the worker of this log learnt were no longer its after `offset` bytes of
    it: aborted in its engine, or (finished meanwhile) their results refused by the store."""
    text = log_path.read_text(errors="replace")[offset:]
    aborted = re.findall(r"aborted (\d+) in-flight requests", text)
    refused = re.findall(r"(\d+) results refused: those requests are no longer this worker's", text)
    return sum(int(n) for n in aborted + refused)


def test_cancel_mid_run_keeps_the_finished_part(vllm_stack, client, db):
    batch = running_batch(client, db, 2000, max_tokens=128)
    logs = [vllm_stack.log_dir / f"worker-{slot}.log" for slot in ("chat-0", "chat-1")]
    offsets = [len(path.read_text(errors="replace")) for path in logs]
    with db.connect() as conn:
        holders = conn.execute(sa.text(
            "SELECT w.slot, w.pid, w.status, count(*) FROM batch_requests r JOIN workers w ON w.id = r.worker_id "
            "WHERE r.batch_id = :b AND r.status = 'running' GROUP BY 1, 2, 3"), {"b": batch.id}).all()
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelled"
    counts = cancelled.request_counts
    lines = all_lines(client, cancelled)
    cancelled_lines = [line for line in lines if (line["error"] or {}).get("code") == "batch_cancelled"]
    assert counts.completed > 0 and cancelled_lines
    assert counts.completed + counts.failed + len(cancelled_lines) == counts.total == 2000
    assert len(read_lines(client, cancelled.output_file_id)) == counts.completed
    assert_each_once(client, cancelled, {f"r{i}" for i in range(2000)})
    # The worker processes heard of it and dropped what they held: their engines stop generating
    # it, or, where it had finished before they heard (a fast machine), the store refuses it.
    try:
        wait_for(lambda: sum(dropped_since(path, offset) for path, offset in zip(logs, offsets, strict=True)) > 0,
                 60, interval=0.5, message="workers dropping the cancelled requests")
    except AssertionError as exc:
        since = {path.name: path.read_text(errors="replace")[offset:].splitlines()[-12:]
                 for path, offset in zip(logs, offsets, strict=True)}
        watchdog = (vllm_stack.log_dir / "watchdog.log").read_text(errors="replace").splitlines()[-12:]
        raise AssertionError(f"{exc}; held at the cancel: {holders}; since: {since}; watchdog: {watchdog}") from None


def test_expiry_with_a_short_window(vllm_stack, client):
    lines = [request_line(f"r{i}", CHAT_MODEL, max_tokens=128) for i in range(3000)]
    batch = submit(client, lines, completion_window="4s")
    done = wait_for_batch(client, batch.id, 120)
    assert done.status == "expired" and done.expired_at
    counts = done.request_counts
    expired = [line for line in all_lines(client, done) if (line["error"] or {}).get("code") == "batch_expired"]
    assert expired and counts.completed + counts.failed + len(expired) == 3000
    assert_each_once(client, done, {f"r{i}" for i in range(3000)})


def test_every_log_line_is_stamped(vllm_stack, api, client, db):
    """The logs hold model loads, claims, throughput lines (a batch runs until chat-0 logs one) and
    whatever else earlier tests left: every line starts with its timestamp and process."""
    worker_log = vllm_stack.log_dir / "worker-chat-0.log"
    wait_for(lambda: live_worker(db, "chat-0"), 600, interval=1, message="chat-0 serving")
    if "throughput: " not in worker_log.read_text():
        batch = submit(client, [request_line(f"t{i}", CHAT_MODEL, max_tokens=128) for i in range(3000)])
        wait_for(lambda: "throughput: " in worker_log.read_text(), 300, interval=1, message="a throughput line")
        client.batches.cancel(batch.id)
    for path in sorted(vllm_stack.log_dir.glob("*.log*")) + sorted(api.log_path.parent.glob("*.log*")):
        log_lines(path)
    chat = "\n".join(log_lines(worker_log))
    for expected in ("loaded in", "claimed ", "throughput: ", " vllm."):  # vLLM's own lines in our format
        assert expected in chat, expected
