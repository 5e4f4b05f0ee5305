"""The `openai-http` engine with two real vLLM OpenAI servers under the real watchdog: batches
through the pool, a server killed, hung, both down, injected faults, a backend's own 400, and
a pool made from BACKENDS alone."""

from __future__ import annotations

import json
import re
import signal

import httpx
import openai
import pytest
import sqlalchemy as sa

from core.batch_app.domain import overview

from .conftest import (
    API_KEY,
    Watchdog,
    batchctl,
    free_port,
    live_worker,
    restarts,
    running_watchdog,
    stack_env,
    wait_for,
    wait_for_batch,
)
from .fault_server import fault_server
from .jsonl import request_line, submit
from .vllm_servers import VllmServer, requests_on

pytestmark = pytest.mark.vllm

SERVED = "pool-llama"  # what users call it; the servers serve it as "pool-demo"
FAST = {"HEARTBEAT_INTERVAL": "1"}


@pytest.fixture(scope="module", autouse=True)
def embedder(data_dir):
    """A real embedding server, started as the module starts: it loads beside the session's demo
    servers rather than after them (its test, second in the module, stops it when done)."""
    server = VllmServer(data_dir, "embed-0", free_port(), model="all-MiniLM-L6-v2", served_name="pool-embed").start()
    yield server
    server.stop()


@pytest.fixture
def servers(demo_servers):
    """The session's two demo servers (the second runs fewer requests at once: a pool of unequal servers)."""
    return demo_servers


def pool_slot(urls: list[str], **options) -> dict:
    return {"slot": "pool-0", "engine": "openai-http", "model": "pool-demo", "served_name": SERVED,
            "backends": urls, "health_interval": 1, "max_in_flight_per_backend": 16, **options}


def backends(db, slot: str = "pool-0") -> dict[str, object]:
    with db.connect() as conn:
        return {row.url: row for row in overview.backends(conn) if row.slot == slot}


def lines_of(client, batch) -> list[dict]:
    found = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            found += [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    return found


def assert_each_once(client, batch, count: int) -> list[dict]:
    found = lines_of(client, batch)
    assert sorted(line["custom_id"] for line in found) == sorted(f"r{i}" for i in range(count))
    return found


def chat_lines(count: int, max_tokens: int = 8) -> list[dict]:
    return [request_line(f"r{i}", SERVED, max_tokens=max_tokens) for i in range(count)]


def worker_log(watchdog) -> str:
    return (watchdog.log_dir / "worker-pool-0.log").read_text(errors="replace")


def test_a_batch_runs_on_both_backends_and_answers_under_the_served_name(database, data_dir, db, client, api,
                                                                         servers):
    with running_watchdog(database, data_dir, "watchdog-pool", [pool_slot([s.url for s in servers])], **FAST):
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        done = wait_for_batch(client, submit(client, chat_lines(120)).id, 300)
        assert done.status == "completed" and done.request_counts.completed == 120
        found = assert_each_once(client, done, 120)
        assert {line["response"]["body"]["model"] for line in found} == {SERVED}
        assert all(line["response"]["body"]["choices"][0]["message"]["content"] is not None for line in found)
        rows = wait_for(lambda: (rows := backends(db)) and sum(r.completed for r in rows.values()) == 120 and rows,
                        10, message="every answer counted by the heartbeat")
        assert all(r.completed for r in rows.values()) and {r.state for r in rows.values()} == {"healthy"}
        assert {m.id for m in client.models.list().data} >= {SERVED}
        metrics = httpx.get(f"{api.base_url}/metrics", timeout=10).text
        for server in servers:
            assert f'batch_backend_up{{backend="{server.url}",slot="pool-0"}} 1.0' in metrics
            assert re.search(rf'batch_backend_requests_total{{backend="{re.escape(server.url)}"}} [1-9]', metrics)


def test_an_embeddings_batch_runs_on_a_pool_of_embedding_servers(database, data_dir, db, client, embedder):
    """Two backends: a real embedding server, and the same server behind a forwarding proxy (a
    second server would only load the model again)."""
    try:
        embedder.wait_ready()
        with fault_server(embedder.url, "forward") as forwarded:
            slot = {**pool_slot([embedder.url, forwarded]), "model": "pool-embed", "served_name": "pool-embedder"}
            with running_watchdog(database, data_dir, "watchdog-pool-embed", [slot], **FAST):
                wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
                lines = [request_line(f"r{i}", "pool-embedder", url="/v1/embeddings") for i in range(60)]
                done = wait_for_batch(client, submit(client, lines, endpoint="/v1/embeddings").id, 120)
                assert done.status == "completed" and done.request_counts.completed == 60
                found = assert_each_once(client, done, 60)
                assert {len(line["response"]["body"]["data"][0]["embedding"]) for line in found} == {384}
                rows = wait_for(lambda: (rows := backends(db)) and sum(r.completed for r in rows.values()) == 60
                                and rows, 10, message="every answer counted by the heartbeat")
                assert set(rows) == {embedder.url, forwarded} and all(r.completed for r in rows.values())
    finally:
        embedder.stop()


def test_a_killed_server_is_failed_over_then_readmitted_when_it_is_back(database, data_dir, db, client, api,
                                                                        servers):
    victim, survivor = servers
    with running_watchdog(database, data_dir, "watchdog-pool-kill", [pool_slot([s.url for s in servers])],
                          **FAST) as watchdog:
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        batch = submit(client, chat_lines(200, max_tokens=32))
        wait_for(lambda: requests_on(victim.url) > 0, 120, interval=0.05, message="the victim holding requests")
        victim.kill()
        wait_for(lambda: backends(db)[victim.url].state == "connection_refused", 30, message="refused")
        listed = batchctl(watchdog.env, "backends")
        assert listed.returncode == 0 and victim.url in listed.stdout and "connection_refused" in listed.stdout
        diagnosis = batchctl(watchdog.env, "--api-url", api.base_url, "diagnose")
        assert f"backend {victim.url} of worker pool-0 is connection_refused" in diagnosis.stdout
        page = httpx.get(f"{api.base_url}/", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
        assert "<h2>Backends</h2>" in page and victim.url in page and "connection_refused" in page
        victim.start()  # loads while the survivor carries the batch, and may take part once back
        done = wait_for_batch(client, batch.id, 300)
        assert done.status == "completed" and done.request_counts.completed == 200
        assert_each_once(client, done, 200)
        failures = [line for line in worker_log(watchdog).splitlines() if f"backend {victim.url} failed request" in line]
        assert failures and all(re.search(r"(ClientConnectorError|ServerDisconnectedError|ClientOSError|ClientPayloadError): \S", line)
                                for line in failures), failures[:3]
        assert all("custom_id r" in line for line in failures)

        victim.wait_ready()
        wait_for(lambda: backends(db)[victim.url].state == "healthy", 60, message="re-admitted")
        answered = backends(db)[victim.url].completed
        again = wait_for_batch(client, submit(client, chat_lines(40)).id, 300)
        assert again.status == "completed" and again.request_counts.completed == 40
        wait_for(lambda: backends(db)[victim.url].completed > answered, 10, message="the victim serving again")
        assert "is healthy again: re-admitted" in worker_log(watchdog)


def test_a_stopped_server_is_hung_its_requests_finish_elsewhere_and_it_comes_back(database, data_dir, db, client,
                                                                                  servers):
    healthy, frozen = servers
    with running_watchdog(database, data_dir, "watchdog-pool-hang", [pool_slot([s.url for s in servers])],
                          **FAST):
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        # Stopped before the batch, so that it holds requests at any speed: its socket still takes
        # the pool's requests and it answers none, and its first health check fails only 5 s on
        # (HEALTH_TIMEOUT). `hung` is said only of a server holding requests.
        frozen.signal(signal.SIGSTOP)
        try:
            batch = submit(client, chat_lines(120, max_tokens=32))
            wait_for(lambda: backends(db)[frozen.url].state == "hung", 30, message="hung")
            done = wait_for_batch(client, batch.id, 300)
            assert done.status == "completed" and done.request_counts.completed == 120
            assert_each_once(client, done, 120)
        finally:
            frozen.signal(signal.SIGCONT)
        wait_for(lambda: backends(db)[frozen.url].state == "healthy", 60, message="back")


def test_with_every_server_down_the_batch_waits_queued_and_completes_when_one_is_back(database, data_dir, db,
                                                                                      client, servers):
    """Stopped servers stall the pool, not its worker: it is not charged a stall (STALL_TIMEOUT is
    shorter than the two failed health checks after which it hands back what they held)."""
    with running_watchdog(database, data_dir, "watchdog-pool-down", [pool_slot([s.url for s in servers])],
                          **FAST, STALL_TIMEOUT="8"):
        worker = wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        charged = len(restarts(db, "pool-0"))
        batch = submit(client, chat_lines(150, max_tokens=48))
        wait_for(lambda: all(requests_on(server.url) > 0 for server in servers), 120, interval=0.05,
                 message="both servers holding requests")
        for server in servers:
            server.signal(signal.SIGSTOP)
        try:
            wait_for(lambda: live_worker(db, "pool-0", statuses=("no_backend",)), 60, message="no backend")
            with pytest.raises(openai.InternalServerError) as refused:
                submit(client.with_options(max_retries=0), chat_lines(1))
            assert refused.value.status_code == 503 and "No backend serving model" in str(refused.value)
            stalled = client.batches.retrieve(batch.id)
            assert stalled.status == "in_progress" and stalled.request_counts.failed == 0
            servers[0].signal(signal.SIGCONT)  # one is back: the batch completes on it alone
            done = wait_for_batch(client, batch.id, 300)
        finally:  # whatever failed, no server is left stopped for the tests after this one
            for server in servers:
                server.signal(signal.SIGCONT)
        assert done.status == "completed" and done.request_counts.completed == 150
        assert_each_once(client, done, 150)
        # The same process (its status may still read no_backend for a beat after the batch).
        assert live_worker(db, "pool-0", statuses=("idle", "busy", "no_backend")).id == worker.id
        assert len(restarts(db, "pool-0")) == charged
        with db.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM batch_requests WHERE batch_id = :b AND crashes > 0"),
                                {"b": batch.id}).scalar() == 0


def test_injected_faults_are_retried_until_every_request_succeeds(database, data_dir, db, client, servers):
    with fault_server(servers[0].url) as faulty:
        with running_watchdog(database, data_dir, "watchdog-pool-faults", [pool_slot([faulty, servers[1].url])],
                              **FAST):
            wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
            done = wait_for_batch(client, submit(client, chat_lines(100)).id, 300)
            assert done.status == "completed" and done.request_counts.completed == 100
            assert all(line["response"]["status_code"] == 200 for line in assert_each_once(client, done, 100))
            errors = wait_for(lambda: backends(db)[faulty].errors, 10, message="faults counted")
            assert {"HTTP 500", "HTTP 429"} <= set(errors) and sum(errors.values()) >= 3, errors
            assert backends(db)[faulty].completed > 0  # it answered the requests it did not fault


def test_a_request_every_try_of_which_gets_a_5xx_ends_as_an_error_line(database, data_dir, db, client, servers):
    """Not back to the queue for ever: backends that answer it with a server error every time refuse it."""
    with fault_server(servers[0].url, "500") as failing, \
            running_watchdog(database, data_dir, "watchdog-pool-500", [pool_slot([failing])], **FAST):
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        done = wait_for_batch(client, submit(client, chat_lines(2)).id, 120)
        assert (done.status, done.request_counts.failed) == ("completed", 2)
        for line in assert_each_once(client, done, 2):
            assert line["response"]["status_code"] == 502
            assert "4 tries failed" in line["response"]["body"]["error"]["message"]
            assert "HTTP 500: " in line["response"]["body"]["error"]["message"]


def test_a_backend_that_fails_fast_is_not_tried_again_for_the_same_request(database, data_dir, db, client,
                                                                            servers):
    """As a vLLM server draining on SIGTERM: 500 to every request, 200 to /health (so it is re-admitted
    at once, with the fewest in flight): each request it failed is retried on the other server."""
    with fault_server(servers[0].url, "500") as failing, \
            running_watchdog(database, data_dir, "watchdog-pool-draining",
                             [pool_slot([failing, servers[1].url], max_in_flight_per_backend=4)], **FAST) as watchdog:
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        # Few in flight a server, so the healthy one is full nearly always while the failing one,
        # re-admitted, has room: a retry must wait for the healthy one, not go back to the other.
        done = wait_for_batch(client, submit(client, chat_lines(100, max_tokens=32)).id, 300)
        assert done.status == "completed" and done.request_counts.completed == 100
        assert all(line["response"]["status_code"] == 200 for line in assert_each_once(client, done, 100))
        failed = re.findall(rf"backend {re.escape(failing)} failed request \d+ \(custom_id (r\d+)\)", worker_log(watchdog))
        assert failed and len(failed) == len(set(failed)), sorted(failed)


def test_a_request_every_server_drops_under_it_ends_as_a_poison_request(database, data_dir, db, client, servers):
    """A request each of whose tries ended with the server going away under it may be what kills
    servers: it is not sent round again."""
    with fault_server(servers[0].url, "close") as dropping, \
            running_watchdog(database, data_dir, "watchdog-pool-poison", [pool_slot([dropping], max_attempts=2)],
                             **FAST):
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        done = wait_for_batch(client, submit(client, chat_lines(2)).id, 120)
        assert (done.status, done.request_counts.failed) == ("completed", 2)
        for line in assert_each_once(client, done, 2):
            error = line["response"]["body"]["error"]
            assert line["response"]["status_code"] == 500 and error["code"] == "poison_request", line
            assert "in flight on 2 servers that failed while holding it" in error["message"]


def test_a_responses_batch_is_forwarded_as_it_is(database, data_dir, db, client, servers):
    """vLLM's own server answers /v1/responses; the pool forwards the line and counts its usage."""
    from openai.types.responses import Response

    with running_watchdog(database, data_dir, "watchdog-pool-responses", [pool_slot([s.url for s in servers])],
                          **FAST):
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        lines = [request_line(f"r{i}", SERVED, url="/v1/responses", max_output_tokens=8) for i in range(6)]
        done = wait_for_batch(client, submit(client, lines, endpoint="/v1/responses").id, 300)
        assert (done.status, done.request_counts.completed) == ("completed", 6)
        for line in assert_each_once(client, done, 6):
            response = Response.model_validate(line["response"]["body"])
            assert response.model == SERVED and response.usage.output_tokens > 0
        assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0


def test_a_backend_listed_twice_is_a_configuration_error():
    from core.batch_app.config import WorkerSlot

    with pytest.raises(ValueError, match="backend http://a:8000 is listed more than once"):
        WorkerSlot(slot="p", engine="openai-http", backends="http://a:8000,http://a:8000/v1/")


def test_a_backend_refusal_is_the_request_error_line_with_its_message(database, data_dir, db, client, servers):
    with running_watchdog(database, data_dir, "watchdog-pool-400", [pool_slot([s.url for s in servers])], **FAST):
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        lines = chat_lines(5)
        lines[2] = request_line("r2", SERVED, max_tokens=100_000)
        done = wait_for_batch(client, submit(client, lines).id, 120)
        assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 4, 1)
        [refused] = [line for line in assert_each_once(client, done, 5) if line["custom_id"] == "r2"]
        assert refused["response"]["status_code"] == 400
        assert "max" in refused["response"]["body"]["error"]["message"].lower()


def test_cancelling_a_batch_cancels_its_requests_on_the_servers(database, data_dir, db, client, servers):
    with running_watchdog(database, data_dir, "watchdog-pool-cancel", [pool_slot([s.url for s in servers])],
                          **FAST):
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        batch = submit(client, chat_lines(200, max_tokens=400))
        wait_for(lambda: sum(r.in_flight for r in backends(db).values()) > 0, 60, interval=0.2, message="in flight")
        aborted = sum(server.aborted() for server in servers)
        client.batches.cancel(batch.id)
        done = wait_for_batch(client, batch.id, 60)
        assert done.status == "cancelled" and done.request_counts.completed < 200
        wait_for(lambda: sum(r.in_flight for r in backends(db).values()) == 0, 10, message="nothing held")
        # The servers saw the connections close and stopped generating those requests.
        wait_for(lambda: sum(server.aborted() for server in servers) > aborted, 20, message="aborted on the servers")


def test_a_bad_backend_url_is_a_clear_start_up_error(database, data_dir):
    watchdog = Watchdog(stack_env(database, data_dir, "watchdog-pool-bad", WORKERS=json.dumps(
        [pool_slot(["htp://nowhere:8000"])])))
    assert watchdog.process.wait(60) == 2
    text = (watchdog.log_dir / "watchdog.log").read_text()
    assert "backend URL 'htp://nowhere:8000' is not an http:// or https:// URL" in text


def test_backends_alone_make_one_pool_worker_per_model_they_serve(database, data_dir, db, client, servers):
    env = stack_env(database, data_dir, "watchdog-pool-discovery", WORKERS="", HEARTBEAT_INTERVAL="1",
                    BACKENDS=",".join(s.url for s in servers), WATCHDOG_CHECK_INTERVAL="0.5")
    watchdog = Watchdog(env)
    try:
        wait_for(lambda: live_worker(db, "pool-pool-demo"), 60, message="discovered pool worker up")
        lines = [request_line(f"r{i}", "pool-demo", max_tokens=8) for i in range(20)]
        done = wait_for_batch(client, submit(client, lines).id, 120)
        assert done.status == "completed" and done.request_counts.completed == 20
        assert set(backends(db, "pool-pool-demo")) == {s.url for s in servers}
    finally:
        assert watchdog.stop() == 0
