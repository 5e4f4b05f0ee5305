"""What OpenMP's wait policy costs a vLLM server on CPU, and the processes beside it.

    .venv/bin/python bench/omp_wait_policy.py [--rounds 3] [--requests 400] [--max-tokens 32]

Each round starts a real vLLM OpenAI server on the demo model twice, in turn: with OpenMP's
default (vLLM's own: threads spin a while after each parallel region before they sleep) and with
OMP_WAIT_POLICY=PASSIVE (what our vllm_environment sets on CPU hosts). Each time it sends the
same requests (64 at a time, aiohttp, greedy, ignore_eos so every answer is max_tokens long) and
prints the wall time, the CPU seconds of the server's processes (front and engine core), and how
far a neighbour got meanwhile: a process counting in a pure-Python loop, as the other work on a
shared host would. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.vllm_servers import VllmServer  # noqa: E402


def count(stop, counted) -> None:
    n = 0
    while not stop.is_set():
        for _ in range(10_000):
            n += 1
    counted.value = n


async def send(url: str, model: str, requests: int, max_tokens: int) -> None:
    limit = asyncio.Semaphore(64)
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            async with limit, session.post(f"{url}/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": f"Tell me about item {i}."}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}) as response:
                assert response.status == 200, await response.text()
                await response.read()

        await asyncio.gather(*(one(i) for i in range(requests)))


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


def measure(root: Path, policy: str | None, requests: int, max_tokens: int) -> tuple[float, float, int]:
    server = VllmServer(root, f"omp-{policy or 'default'}", free_port())
    if policy is None:
        server.env.pop("OMP_WAIT_POLICY", None)
    else:
        server.env["OMP_WAIT_POLICY"] = policy
    server.start()
    try:
        server.wait_ready()
        processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
        stop, counted = multiprocessing.Event(), multiprocessing.Value("q", 0)
        neighbour = multiprocessing.Process(target=count, args=(stop, counted))
        neighbour.start()
        spent, started = cpu_seconds(processes), time.monotonic()
        asyncio.run(send(server.url, server.served_name, requests, max_tokens))
        wall, spent = time.monotonic() - started, cpu_seconds(processes) - spent
        stop.set()
        neighbour.join(30)
        return wall, spent, counted.value
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, int]]] = {"default": [], "PASSIVE": []}
    with tempfile.TemporaryDirectory(prefix="omp-bench-") as root:
        for round_number in range(1, args.rounds + 1):
            for name in results:
                wall, cpu, counted = measure(Path(root), None if name == "default" else name, args.requests,
                                             args.max_tokens)
                results[name].append((wall, cpu, counted))
                print(f"round {round_number} {name:8} wall {wall:6.2f} s  server CPU {cpu:6.2f} s  "
                      f"neighbour {counted / wall / 1e6:6.1f} M counts/s", flush=True)
    for name, rows in results.items():
        print(f"median {name:8} wall {statistics.median(r[0] for r in rows):6.2f} s  "
              f"server CPU {statistics.median(r[1] for r in rows):6.2f} s  "
              f"neighbour {statistics.median(r[2] / r[0] for r in rows) / 1e6:6.1f} M counts/s")


if __name__ == "__main__":
    main()
