"""Interactive latency and batch rate on two vLLM servers that serve both, in one run.

Two vLLM OpenAI servers on the demo model (each pinned to a core of its own, run with
`--scheduling-policy priority`), an interactive client that streams chat requests to them in
turn at a steady rate with a burst of simultaneous requests mid-phase (aiohttp, time to first
token and total latency of each), and a large batch through our API and an `openai-http` pool
worker over the same servers. Phases:

  (a) interactive alone
  (b) beside the batch in the pool's fixed mode (max_in_flight_per_backend 64, today's default)
  (c) beside the batch with `interactive_traffic` (and `batch_priority`)
  (d) the batch alone (fixed mode, 64)
  (e) beside the batch under each fixed max_in_flight_per_backend of --caps ((b) is e64)

    .venv/bin/python bench/shared_servers.py [--seconds 40] [--rate 4] [--burst 8] [--rounds 2]
                                             [--caps 1,2,4,8,16,32] [--ttft-target 0.1] [--phases c,e8]

Each phase starts the pool worker with its settings, submits the batch, lets it run
--warm-up seconds, then measures for --seconds: the interactive requests sent in that time,
and the batch's requests completed in it (its counts read at both ends); then cancels the batch
and waits until both servers run nothing, and --settle seconds more.
Rounds run the phases in alternating order. Printed: interactive TTFT p50/p99 and total
latency p99 of each phase over (a)'s, each batch rate over (d)'s, and the cores each group of
processes used in the measured seconds (engines, the servers' front ends, pool worker, API,
watchdog, PostgreSQL, this client). Targets: (c) TTFT p99 at
most 1.5x (a)'s, and (c)'s batch rate above every fixed cap's whose p99 is within 1.5x too.
All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cpu import cpu_seconds, postgres_processes  # noqa: E402
from bench.scratch import scratch_database  # noqa: E402
from core.batch_app.domain.statuses import FINAL_BATCH_STATUSES  # noqa: E402
from core.batch_app.engines.batch_allowance import read_metrics  # noqa: E402
from tests.conftest import free_port, live_worker, start_api, start_watchdog, wait_for  # noqa: E402
from tests.vllm_servers import VllmServer  # noqa: E402

MODEL = "shared-demo"
BATCH_PRIORITY = 10


def batch_file(count: int, max_tokens: int) -> bytes:
    topics = ["the sea", "a library", "mountains", "trains", "a kitchen", "the moon", "rain", "a garden"]
    return "".join(json.dumps({
        "custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
                 "messages": [{"role": "user", "content": f"Batch {i}: a story about {topics[i % len(topics)]}."}]}})
        + "\n" for i in range(count)).encode()


class Interactive:
    """Streaming chat requests straight to the servers, in turn: their TTFT and total latency."""

    def __init__(self, urls: list[str], max_tokens: int) -> None:
        self.urls, self.max_tokens = urls, max_tokens
        self.turn = 0

    async def one(self, session: aiohttp.ClientSession, results: list) -> None:
        url = self.urls[self.turn % len(self.urls)]
        self.turn += 1
        body = {"model": MODEL, "max_tokens": self.max_tokens, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": f"Question {self.turn}: what is a good name for a cat?"}]}
        started = time.perf_counter()
        first = None
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.content:
                if first is None and line.startswith(b"data: {") and b'"content"' in line:
                    first = time.perf_counter() - started
        results.append((first if first is not None else time.perf_counter() - started,
                        time.perf_counter() - started))

    async def run(self, seconds: float, rate: float, burst: int) -> list[tuple[float, float]]:
        """Requests at `rate` a second for `seconds`, and `burst` more at once halfway."""
        results: list[tuple[float, float]] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            tasks = []
            started = time.perf_counter()
            sent, burst_sent = 0, False
            while (now := time.perf_counter() - started) < seconds:
                if not burst_sent and now >= seconds / 2:
                    tasks += [asyncio.create_task(self.one(session, results)) for _ in range(burst)]
                    burst_sent = True
                tasks.append(asyncio.create_task(self.one(session, results)))
                sent += 1
                await asyncio.sleep(max(0.0, sent / rate - (time.perf_counter() - started)))
            await asyncio.gather(*tasks)
        return results


# Who used the two cores in a phase, told apart by command line (the engines name themselves);
# PostgreSQL's processes as bench/cpu.py finds them, and this bench's own as "client".
PROCESS_GROUPS = {"engines": "VLLM::EngineCore", "front ends": "vllm.entrypoints", "pool worker": "batch_app.worker",
                  "API": "batch_app.api_server", "watchdog": "batch_app.watchdog"}
GROUPS = [*PROCESS_GROUPS, "PostgreSQL", "client"]


def cpu_seconds_by_group() -> dict[str, float]:
    """CPU seconds each group of processes has used so far."""
    groups: dict[str, list[psutil.Process]] = {name: [] for name in GROUPS}
    groups["PostgreSQL"] = postgres_processes()
    for process in psutil.process_iter(["pid", "cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        group = "client" if process.info["pid"] == os.getpid() else next(
            (name for name, mark in PROCESS_GROUPS.items() if mark in command), None)
        if group is not None:
            groups[group].append(process)
    return {name: cpu_seconds(processes) for name, processes in groups.items()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class Stack:
    def __init__(self, url: str, data_dir: Path, db, backends: list[str], args) -> None:
        self.url, self.data_dir, self.db, self.backends, self.args = url, data_dir, db, backends, args
        self.api = start_api(url, data_dir, "api", API_KEY="", OPEN_ACCESS="true")
        self.client = self.api.client()
        self.file = self.client.files.create(file=("batch.jsonl", batch_file(args.batch, args.batch_tokens)),
                                             purpose="batch")
        self.phases = 0

    def phase(self, interactive: Interactive | None, pool: dict | None) -> dict:
        """One phase: the pool worker with `pool`'s options (None: no batch) and the client."""
        watchdog = batch = None
        self.phases += 1
        try:
            if pool is not None:
                slot = {"slot": "pool-0", "engine": "openai-http", "model": MODEL, "backends": self.backends,
                        "health_interval": 2, **pool}
                watchdog = start_watchdog(self.url, self.data_dir, f"watchdog-{self.phases}", [slot], API_KEY="")
                wait_for(lambda: live_worker(self.db, "pool-0"), 120, interval=0.5, message="pool worker up")
                batch = self.client.batches.create(input_file_id=self.file.id, endpoint="/v1/chat/completions",
                                                   completion_window="24h")
                time.sleep(self.args.warm_up)
                done_before = self.client.batches.retrieve(batch.id).request_counts.completed
            started, cpu_before = time.perf_counter(), cpu_seconds_by_group()
            if interactive is not None:
                results = asyncio.run(interactive.run(self.args.seconds, self.args.rate, self.args.burst))
            else:
                time.sleep(self.args.seconds)
                results = []
            seconds = time.perf_counter() - started
            cores = {group: (used - cpu_before[group]) / seconds for group, used in cpu_seconds_by_group().items()}
            rate = None
            if batch is not None:
                counts = self.client.batches.retrieve(batch.id).request_counts
                rate = (counts.completed - done_before) / seconds
                if counts.completed == counts.total:
                    print(f"    the batch ran out during the phase: make --batch larger than {counts.total}")
            return {"ttft": [r[0] for r in results], "total": [r[1] for r in results], "rate": rate, "cores": cores}
        finally:
            if batch is not None and self.client.batches.retrieve(batch.id).status not in FINAL_BATCH_STATUSES:
                self.client.batches.cancel(batch.id)
                wait_for(lambda: self.client.batches.retrieve(batch.id).status == "cancelled", 120,
                         interval=0.5, message="the batch cancelled")
            if watchdog is not None:
                watchdog.stop()
            self.settle()

    def settle(self) -> None:
        """Until both servers run nothing (a cancelled batch's requests are aborted as their
        connections close), then a few seconds for PostgreSQL's own work after a batch."""
        def idle(url: str) -> bool:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            reading = read_metrics(text)
            return reading is not None and reading.running + reading.waiting == 0

        wait_for(lambda: all(idle(url) for url in self.backends), 120, interval=0.5, message="the servers idle")
        time.sleep(self.args.settle)

    def stop(self) -> None:
        self.api.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=40.0, help="measured seconds of each phase")
    parser.add_argument("--warm-up", type=float, default=8.0, help="seconds the batch runs before a phase is measured")
    parser.add_argument("--rate", type=float, default=4.0, help="interactive requests a second")
    parser.add_argument("--burst", type=int, default=8, help="interactive requests sent at once halfway")
    parser.add_argument("--max-tokens", type=int, default=32, help="of an interactive request")
    parser.add_argument("--batch", type=int, default=30000, help="requests of the batch (it must outlast a phase)")
    parser.add_argument("--batch-tokens", type=int, default=32, help="max_tokens of a batch request")
    parser.add_argument("--caps", default="1,2,4,8,16,32", help="fixed max_in_flight_per_backend of (e); 64 is (b)")
    parser.add_argument("--ttft-target", type=float, default=0.1, help="interactive_ttft_target of (c), seconds")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of quiet after each phase")
    parser.add_argument("--phases", default="", help="only these phases, as a,c,e8 ((a) and (d) always run)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    caps = [int(cap) for cap in args.caps.split(",")]
    shared = {"interactive_traffic": True, "interactive_ttft_target": args.ttft_target,
              "batch_priority": BATCH_PRIORITY, "max_in_flight_per_backend": 64}
    phases = {"a": (True, None), "b": (True, {"max_in_flight_per_backend": 64}), "c": (True, shared),
              "d": (False, {"max_in_flight_per_backend": 64})}
    phases.update({f"e{cap}": (True, {"max_in_flight_per_backend": cap}) for cap in caps})
    if args.phases:
        chosen = {"a", "d", *args.phases.split(",")}
        phases = {name: phase for name, phase in phases.items() if name in chosen}
        caps = [cap for cap in caps if f"e{cap}" in phases]
    print(f"two vLLM servers on the demo model, a core each; interactive: {args.rate:g}/s streaming chat, "
          f"max_tokens {args.max_tokens}, a burst of {args.burst} halfway; batch: {args.batch} requests, "
          f"max_tokens {args.batch_tokens}; {args.seconds:g} s measured a phase; {os.cpu_count()} CPUs")
    with scratch_database("shared-") as (data_dir, url, db):
        servers = []
        for core in range(2):
            server = VllmServer(data_dir, f"shared-{core}", free_port(), served_name=MODEL)
            server.command += ["--scheduling-policy", "priority"]
            server.env["VLLM_CPU_OMP_THREADS_BIND"] = str(core % (os.cpu_count() or 1))
            servers.append(server.start())
        stack = None
        try:
            for server in servers:
                server.wait_ready()
            urls = [server.url for server in servers]
            interactive = Interactive(urls, args.max_tokens)
            asyncio.run(interactive.run(3, args.rate, 0))  # warm-up
            stack = Stack(url, data_dir, db, urls, args)
            results: dict[str, list[dict]] = {name: [] for name in phases}
            for number in range(1, args.rounds + 1):
                order = list(phases) if number % 2 else list(reversed(phases))
                for name in order:
                    with_client, pool = phases[name]
                    result = stack.phase(interactive if with_client else None, pool)
                    results[name].append(result)
                    shown = (f"TTFT p50 {percentile(result['ttft'], 50) * 1000:6.0f} ms p99 "
                             f"{percentile(result['ttft'], 99) * 1000:6.0f} ms, total p99 "
                             f"{percentile(result['total'], 99) * 1000:6.0f} ms" if result["ttft"] else "")
                    rate = f"batch {result['rate']:6.1f} req/s" if result["rate"] is not None else ""
                    print(f"  round {number} ({name}): {shown}  {rate}\n    cores used: "
                          + ", ".join(f"{group} {cores:.2f}" for group, cores in result["cores"].items()))
            report(results, caps)
        finally:
            if stack is not None:
                stack.stop()
            for server in servers:
                server.stop()
    return 0


def report(results: dict[str, list[dict]], caps: list[int]) -> None:
    """Each phase's figures pooled over the rounds: TTFT over (a)'s, batch rate over (d)'s."""
    def pooled(name: str, key: str) -> list[float]:
        return [value for result in results[name] for value in result[key]]

    def rate(name: str) -> float:
        return statistics.median(result["rate"] for result in results[name])

    alone_p50, alone_p99 = percentile(pooled("a", "ttft"), 50), percentile(pooled("a", "ttft"), 99)
    alone_total = percentile(pooled("a", "total"), 99)
    alone_rate = rate("d")
    print(f"(a) alone: TTFT p50 {alone_p50 * 1000:.0f} ms, p99 {alone_p99 * 1000:.0f} ms, total p99 "
          f"{alone_total * 1000:.0f} ms; (d) batch alone: {alone_rate:.1f} requests/s")
    print(f"{'phase':<22} {'TTFT p50':>9} {'TTFT p99':>9} {'total p99':>10} {'batch rate':>11}")
    within = {}
    names = [name for name in ["b", "c"] if name in results] + [f"e{cap}" for cap in caps]
    labels = {"b": "(b) fixed 64", "c": "(c) interactive_traffic"} | {f"e{cap}": f"(e) fixed {cap}" for cap in caps}
    for name in names:
        p50, p99 = percentile(pooled(name, "ttft"), 50) / alone_p50, percentile(pooled(name, "ttft"), 99) / alone_p99
        total = percentile(pooled(name, "total"), 99) / alone_total
        within[name] = p99 <= 1.5
        print(f"{labels[name]:<22} {p50:8.2f}x {p99:8.2f}x {total:9.2f}x {rate(name) / alone_rate:10.2f}x"
              f"{'' if within[name] else '   (p99 past 1.5x)'}")
    print("cores used in the measured seconds (mean over rounds):")
    print(f"{'phase':<22} " + " ".join(f"{group:>11}" for group in GROUPS))
    for name in ["a", "d", *names]:
        groups = results[name][0]["cores"]
        print(f"{labels.get(name, f'({name})'):<22} " + " ".join(
            f"{statistics.mean(result['cores'][group] for result in results[name]):11.2f}" for group in groups))
    if "c" not in results:
        return
    best = max((name for name in names if name != "c" and within[name]), key=rate, default=None)
    print(f"target 1, (c) TTFT p99 <= 1.5x (a): {'met' if within['c'] else 'NOT met'}")
    if best is None:
        print("target 2: no fixed cap holds TTFT p99 within 1.5x; (c) has nothing to beat")
    else:
        verdict = "met" if rate("c") > rate(best) else "NOT met"
        print(f"target 2, (c) batch rate above the best fixed cap within 1.5x ({labels[best]}, "
              f"{rate(best):.1f}/s): {rate('c'):.1f}/s, {verdict}")


if __name__ == "__main__":
    sys.exit(main())
