"""How fast the API answers while the machine works, against a minimal app on the same machine.

    .venv/bin/python bench/api_load.py [--clients 32] [--creators 4] [--seconds 30] [--rounds 3] [--pace 0.5]

Phases, each `--seconds` long:
- idle, retrieve only: `--clients` loops retrieving one batch, against a minimal FastAPI app
  answering one primary-key SELECT on the same PostgreSQL, awaited on its event loop, with the
  same load generator (the ceiling), in alternating rounds (`--rounds`, each side a third of the
  phase);
- idle, then while a real vLLM worker runs a 3,000-request batch: `--clients` readers, each
  calling /health, retrieve and list (20) in turn, while `--creators` loops upload a 5-line file
  and create a batch of it, again and again, each client calling again as soon as it has its
  answer (a closed loop: the API is saturated, and every call waits its turn);
- while the batch runs, the same clients paced: each calls once every `--pace` seconds (0.5 by
  default: 64 reads and 8 creates a second offered), so latency is that of a busy API, not of
  one saturated by the load generator;
- then 40 batches are created at once while the batch still runs.

Prints requests/s and p50/p99 latency per call. Targets while the batch runs: /health p99 under
100 ms, retrieve and list p99 under 300 ms; 40 concurrent creates all accepted with no 5xx; idle
retrieve at least half the minimal app's requests/s. On 2 cores the load generator competes with
what it measures, which is why the minimal app is measured by the same generator. All traffic
goes to 127.0.0.1; every loop stops after its phase's seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.scratch import scratch_database  # noqa: E402
from tests.conftest import free_port, live_worker, start_api, start_watchdog, wait_for  # noqa: E402

API_KEY = "sk-bench"
MODEL = "demo-tiny-llama"

# The ceiling: one route, one primary-key SELECT awaited on the event loop on a kept asyncio
# connection in autocommit, nothing else: the fastest way known here to read a row from FastAPI
# (docs/benchmarks.md has the threadpool-and-SQLAlchemy app it replaced).
MINIMAL_APP = """
import asyncio
import sys
import psycopg
import uvicorn
from fastapi import FastAPI
from sqlalchemy.engine import make_url

url = make_url(sys.argv[1]).set(drivername="postgresql").render_as_string(hide_password=False)
slots, idle = asyncio.Semaphore(10), []
app = FastAPI()

@app.get("/v1/batches/{batch_id}")
async def retrieve(batch_id: str):
    async with slots:
        conn = idle.pop() if idle else await psycopg.AsyncConnection.connect(url, autocommit=True)
        cursor = await conn.execute("SELECT id, status FROM batches WHERE id = %s", (batch_id,))
        row = await cursor.fetchone()
        idle.append(conn)
    return {"id": row[0], "status": row[1]}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def lines(count: int, max_tokens: int, prefix: str) -> bytes:
    return b"".join(json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": MODEL, "max_tokens": max_tokens,
                                         "messages": [{"role": "user", "content": f"Tell me about {i}."}]}}).encode()
                    + b"\n" for i in range(count))


class Calls:
    """The calls clients make against one base URL (aiohttp: the generator must cost the machine
    less than what it measures; httpx spends several times the CPU per call)."""

    def __init__(self, client: aiohttp.ClientSession, base: str, batch_id: str):
        self.client, self.base, self.batch_id = client, base, batch_id
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

    async def _status(self, method: str, url: str, **kwargs) -> tuple[int, bytes]:
        async with self.client.request(method, f"{self.base}{url}", **kwargs) as response:
            return response.status, await response.read()

    async def call(self, name: str) -> int:
        if name == "health":
            return (await self._status("GET", "/health"))[0]
        if name == "retrieve":
            return (await self._status("GET", f"/v1/batches/{self.batch_id}", headers=self.headers))[0]
        if name == "list":
            return (await self._status("GET", "/v1/batches?limit=20", headers=self.headers))[0]
        return await self.create(lines(5, 4, "load"))

    async def create(self, content: bytes) -> int:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", content, filename="load.jsonl")
        status, body = await self._status("POST", "/v1/files", headers=self.headers, data=form)
        if status != 200:
            return status
        return (await self._status("POST", "/v1/batches", headers=self.headers, json={
            "input_file_id": json.loads(body)["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}))[0]


READS = ["health", "retrieve", "list"]


async def load(calls: Calls, loops: list[list[str]], seconds: float, pace: float = 0.0) -> dict[str, dict]:
    """One client per entry of `loops`, each calling its kinds of call in turn until `seconds` are
    over: at once after the last answer (pace 0, a closed loop that saturates the API), or one
    call every `pace` seconds (at once when the last took longer)."""
    names = sorted({name for kinds in loops for name in kinds}, key=(READS + ["upload + create"]).index)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    failures: dict[str, int] = {name: 0 for name in names}
    deadline = time.monotonic() + seconds

    async def client_loop(kinds: list[str], offset: int) -> None:
        turn = offset
        await asyncio.sleep(pace * offset / len(loops))  # paced clients spread over the interval
        while time.monotonic() < deadline:
            name = kinds[turn % len(kinds)]
            turn += 1
            started = time.perf_counter()
            try:
                status = await calls.call(name)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = 0
            latencies[name].append(time.perf_counter() - started)
            failures[name] += status != 200
            await asyncio.sleep(max(0.0, pace - (time.perf_counter() - started)))

    started = time.monotonic()
    await asyncio.gather(*(client_loop(kinds, i) for i, kinds in enumerate(loops)))
    elapsed = time.monotonic() - started
    return {name: {"rate": len(values) / elapsed, "p50": _percentile(values, 50), "p99": _percentile(values, 99),
                   "failed": failures[name], "count": len(values)} for name, values in latencies.items()}


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) >= 2 else float("nan")


def show(title: str, results: dict[str, dict]) -> None:
    print(title)
    for name, r in results.items():
        print(f"  {name:16} {r['rate']:7.1f} requests/s  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms"
              f"  ({r['count']} calls, {r['failed']} not 200)")


def _client(connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                 connector=aiohttp.TCPConnector(limit=connections))


async def retrieve_rounds(base: str, minimal_base: str, batch_id: str, args) -> tuple[list[dict], list[dict]]:
    """Retrieve-only load on ours and on the minimal app, in alternating rounds."""
    ours, minimal = [], []
    async with _client(args.clients) as client:
        for _ in range(args.rounds):
            for side, url in ((ours, base), (minimal, minimal_base)):
                side.append((await load(Calls(client, url, batch_id), [["retrieve"]] * args.clients,
                                        args.seconds / args.rounds))["retrieve"])
    return ours, minimal


async def mixed(base: str, batch_id: str, args, pace: float = 0.0) -> dict[str, dict]:
    loops = [READS] * args.clients + [["upload + create"]] * args.creators
    async with _client(args.clients + args.creators) as client:
        return await load(Calls(client, base, batch_id), loops, args.seconds, pace)


async def burst(base: str, batch_id: str, count: int) -> list[int]:
    async with _client(count) as client:
        calls = Calls(client, base, batch_id)
        content = lines(5, 4, "burst")
        return list(await asyncio.gather(*(calls.create(content) for _ in range(count))))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--creates", type=int, default=40)
    parser.add_argument("--creators", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pace", type=float, default=0.5, help="seconds between a paced client's calls")
    args = parser.parse_args()
    print(f"{args.clients} readers and {args.creators} creators, {args.seconds:.0f} s a phase, "
          f"{os.cpu_count()} CPUs")
    with scratch_database("api-load-") as (data_dir, url, db):
        api = start_api(url, data_dir, "api", API_KEY=API_KEY)
        watchdog = start_watchdog(url, data_dir, "watchdog", [{"slot": "chat-0", "model": "demo"}], API_KEY=API_KEY)
        port = free_port()
        minimal_app = subprocess.Popen([sys.executable, "-c", MINIMAL_APP, url, str(port)])
        try:
            wait_for(lambda: live_worker(db, "chat-0"), 600, interval=0.5, message="worker loaded")
            client = api.client(API_KEY)
            probe = client.batches.create(input_file_id=client.files.create(
                file=("probe.jsonl", lines(1, 4, "probe")), purpose="batch").id,
                endpoint="/v1/chat/completions", completion_window="24h")
            wait_for(lambda: client.batches.retrieve(probe.id).status == "completed", 120, message="probe batch")
            minimal_base = f"http://127.0.0.1:{port}"
            wait_for(lambda: _answers(f"{minimal_base}/v1/batches/{probe.id}"), 60, message="minimal app")

            ours, minimal = asyncio.run(retrieve_rounds(api.base_url, minimal_base, probe.id, args))
            print("idle, retrieve only, alternating rounds (requests/s, p99):")
            for round_, (a, b) in enumerate(zip(ours, minimal, strict=True), 1):
                print(f"  round {round_}: ours {a['rate']:7.1f} ({a['p99']:6.1f} ms)   minimal app {b['rate']:7.1f} "
                      f"({b['p99']:6.1f} ms)   ratio {a['rate'] / b['rate']:.2f}")
            print(f"  median ratio, ours / minimal: "
                  f"{statistics.median(a['rate'] / b['rate'] for a, b in zip(ours, minimal, strict=True)):.2f}")
            show("idle, readers and creators", asyncio.run(mixed(api.base_url, probe.id, args)))

            running = client.batches.create(input_file_id=client.files.create(
                file=("running.jsonl", lines(3000, 256, "run")), purpose="batch").id,
                endpoint="/v1/chat/completions", completion_window="24h")
            wait_for(lambda: client.batches.retrieve(running.id).request_counts.completed > 0, 120,
                     message="the batch running")
            show("while a 3,000-request batch runs, readers and creators", asyncio.run(mixed(api.base_url, probe.id, args)))
            show(f"while it runs, the same clients paced at one call every {args.pace:g} s each",
                 asyncio.run(mixed(api.base_url, probe.id, args, args.pace)))
            statuses = asyncio.run(burst(api.base_url, probe.id, args.creates))
            print(f"{args.creates} creates at once while the batch runs: "
                  f"{sum(s == 200 for s in statuses)} accepted, {sum(s >= 500 for s in statuses)} 5xx, "
                  f"others {[s for s in statuses if s != 200 and s < 500]}")
            still_running = client.batches.retrieve(running.id).status
            print(f"the batch was {still_running} at the end of the busy phase")
            client.batches.cancel(running.id)
        finally:
            minimal_app.terminate()
            minimal_app.wait(15)
            watchdog.stop()
            api.stop()
    return 0


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
