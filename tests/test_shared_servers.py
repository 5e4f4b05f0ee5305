"""A pool whose vLLM servers also serve people (`interactive_traffic`), with a real vLLM server
run with priority scheduling and a real interactive client: a burst of interactive requests cuts
the batch allowance within seconds, what the server held past the cut is taken back and run
again uncharged, the allowance grows back once the burst is over, and the batch loses and repeats
nothing. Requests too short to be found running are seen by the server's count of answered
requests. A server that keeps its /metrics to itself (the fault proxy) is steered by latency."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading

import aiohttp
import httpx
import pytest
import sqlalchemy as sa

from core.batch_app.domain import overview

from .conftest import API_KEY, SHARED_SEQUENCES, batchctl, live_worker, running_watchdog, wait_for, wait_for_batch
from .fault_server import fault_server
from .jsonl import request_line, submit

pytestmark = pytest.mark.vllm

SERVED = "shared-llama"
CEILING = 2 * SHARED_SEQUENCES
# Enough lines to hold the server at the allowance's ceiling when the burst comes (the allowance
# is steered whether the pool has work or not, so the batch need not outlast its growing back).
BATCH_LINES = 400


@pytest.fixture
def server(demo_servers):
    """The demo server that serves interactive requests before batch ones (larger `priority`:
    later), running at most SHARED_SEQUENCES requests at once: the pool's CEILING fills it, so an
    interactive request waits in its queue unless the pool gives room back."""
    return demo_servers[1]


def shared_slot(urls: list[str], **options) -> dict:
    return {"slot": "pool-0", "engine": "openai-http", "model": "pool-demo", "served_name": SERVED,
            "backends": urls, "health_interval": 1, "max_in_flight_per_backend": CEILING,
            "interactive_traffic": True, "interactive_quiet_seconds": 3, "interactive_ttft_target": 0.5,
            "batch_priority": 10, **options}


def backend(db, url: str):
    with db.connect() as conn:
        return next((row for row in overview.backends(conn) if row.url == url), None)


@contextlib.contextmanager
def rows_sampled(db, url: str):
    """The backend's row, read every 0.2 s while the block runs."""
    rows, done = [], threading.Event()

    def sample():
        while not done.wait(0.2):
            rows.append(backend(db, url))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield rows
    finally:
        done.set()
        sampler.join()


def output_ids(client, batch) -> list[str]:
    ids = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            ids += [json.loads(line)["custom_id"] for line in client.files.content(file_id).text.splitlines()]
    return ids


async def interactive_burst(url: str, count: int, seconds: float) -> int:
    """`count` streaming chat requests at a time, again and again for `seconds`, as people would
    send them; how many were answered."""
    answered = 0
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            nonlocal answered
            body = {"model": "pool-demo", "max_tokens": 48, "stream": True,
                    "messages": [{"role": "user", "content": f"Person {i}: tell me about ships."}]}
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                assert response.status == 200
                async for _ in response.content:
                    pass
            answered += 1

        deadline = asyncio.get_running_loop().time() + seconds
        turn = 0
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.gather(*(one(turn * count + i) for i in range(count)))
            turn += 1
    return answered


def test_a_burst_cuts_the_allowance_at_once_and_it_grows_back_losing_nothing(database, data_dir, db, client, api,
                                                                            server):
    with running_watchdog(database, data_dir, "watchdog-shared", [shared_slot([server.url])],
                          HEARTBEAT_INTERVAL="1") as watchdog:
        wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
        batch = submit(client, [request_line(f"r{i}", SERVED, max_tokens=32) for i in range(BATCH_LINES)])
        full = wait_for(lambda: (row := backend(db, server.url)) and row.allowance == CEILING and row, 60,
                        interval=0.2, message="the allowance at its ceiling with no interactive traffic")
        assert full.allowance_reason.startswith("no_interactive:")
        aborted = server.aborted()

        with rows_sampled(db, server.url) as rows:  # the cut lasts until 3 s after the burst: read it during it
            answered = asyncio.run(interactive_burst(server.url, 4, 6))
        assert answered >= 4
        cut = next((row for row in rows if row.allowance < CEILING), rows[-1])
        log = (watchdog.log_dir / "worker-pool-0.log").read_text(errors="replace")
        cuts = re.findall(rf"backend {re.escape(server.url)}: batch allowance (\d+) -> (\d+) \((\w+):", log)
        assert cuts and int(cuts[0][0]) == CEILING and {kind for *_, kind in cuts} <= {
            "interactive_queued", "ttft_over_target", "cache_pressure"}, cuts
        assert cut.allowance < CEILING and cut.allowance_reason.split(":")[0] in {
            "interactive_queued", "ttft_over_target", "interactive_within_target"}, cut
        # What the server held past the cut was taken back from it (the server aborted them).
        wait_for(lambda: server.aborted() > aborted, 10, message="batch requests taken back from the server")

        listed = batchctl(watchdog.env, "backends")
        assert listed.returncode == 0 and "batch allowance" in listed.stdout, listed
        row = next(line for line in listed.stdout.splitlines() if server.url in line)
        assert re.search(r" \d+ \((interactive_queued|ttft_over_target|cache_pressure|interactive_within_target|"
                         r"no_interactive): ", row), listed.stdout  # the allowance and why, whichever it is by now
        page = httpx.get(f"{api.base_url}/", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
        assert "batch allowance" in page
        metrics = httpx.get(f"{api.base_url}/metrics", timeout=10).text
        assert re.search(rf'batch_backend_allowance{{backend="{re.escape(server.url)}",reason="\w+",slot="pool-0"}} '
                         r"\d+\.0", metrics), metrics

        # On a fast machine the allowance may be back at its ceiling while the burst lasts
        # (interactive_within_target): what shows the burst's end is the reason.
        wait_for(lambda: (row := backend(db, server.url)) and row.allowance == CEILING
                 and row.allowance_reason.startswith("no_interactive:"), 30, interval=0.2,
                 message="the allowance back at its ceiling with no interactive traffic after the burst")
        done = wait_for_batch(client, batch.id, 600)
    assert done.status == "completed" and done.request_counts.completed == BATCH_LINES
    ids = output_ids(client, done)
    assert sorted(ids) == sorted(f"r{i}" for i in range(BATCH_LINES))
    with db.connect() as conn:  # taken back is not run again through the queue, nor charged
        runs = conn.execute(sa.text("SELECT max(attempt), max(crashes) FROM batch_requests WHERE batch_id = :b"),
                            {"b": batch.id}).one()
    assert tuple(runs) == (1, 0)


def test_interactive_requests_too_short_to_be_seen_running_are_seen_by_the_servers_answer_count(
        database, data_dir, db, server):
    """One-token requests, one at a time, against readings 2 s apart: a reading rarely finds one
    running, but each raises the server's count of answered requests past the pool's."""
    slot = shared_slot([server.url], metrics_interval=2)
    with running_watchdog(database, data_dir, "watchdog-shared-short", [slot], HEARTBEAT_INTERVAL="1"):
        wait_for(lambda: (row := backend(db, server.url)) and row.allowance == CEILING
                 and row.allowance_reason.startswith("no_interactive:"), 60, interval=0.2,
                 message="the allowance at its ceiling with no interactive traffic")
        stop, statuses = threading.Event(), []

        def person() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                while not stop.wait(0.5):
                    statuses.append(http.post("/v1/chat/completions", json={
                        "model": "pool-demo", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
                    ).status_code)

        talking = threading.Thread(target=person)
        talking.start()
        try:
            seen = wait_for(lambda: (row := backend(db, server.url))
                            and row.allowance_reason.startswith("interactive_within_target:") and row, 20,
                            interval=0.2, message="the short interactive requests seen")
        finally:
            stop.set()
            talking.join()
        assert statuses and set(statuses) == {200}, statuses  # asserted here: a thread's failure fails no test
        assert seen.allowance == CEILING  # within the TTFT target with nothing waiting: nothing to cut
        wait_for(lambda: backend(db, server.url).allowance_reason.startswith("no_interactive:"), 20, interval=0.2,
                 message="no interactive traffic once the requests stopped")


def test_a_server_without_metrics_is_steered_by_the_latency_of_its_answers(database, data_dir, db, client, server):
    with fault_server(server.url, "forward") as proxy:
        with running_watchdog(database, data_dir, "watchdog-shared-latency", [shared_slot([proxy])],
                              HEARTBEAT_INTERVAL="1"):
            wait_for(lambda: live_worker(db, "pool-0"), 60, message="pool worker up")
            batch = submit(client, [request_line(f"r{i}", SERVED, max_tokens=16) for i in range(40)])
            steered = wait_for(lambda: (row := backend(db, proxy)) and row.allowance_reason.startswith("latency_")
                               and row, 60, interval=0.2, message="the allowance steered by latency")
            assert "(no /metrics)" in steered.allowance_reason and 1 <= steered.allowance <= CEILING
            done = wait_for_batch(client, batch.id, 300)
    assert done.status == "completed" and done.request_counts.completed == 40
    assert sorted(output_ids(client, done)) == sorted(f"r{i}" for i in range(40))
