"""Generated tokens/s of the same chat requests on the same two vLLM OpenAI servers (demo model,
each `python -m vllm.entrypoints.openai.api_server` on a local port), in one run:

  (a) sent straight to the two servers by an asyncio `openai` client, requests shared between
      them in turn, at its best concurrency: every concurrency in `--concurrency` is tried
      once first and the fastest is kept (the harness approach of our users' write-ups);
  (b) our server end to end: upload -> batch -> output file downloaded, run by one
      `openai-http` pool worker over the same two servers, with as many requests in flight per
      server as (a)'s best concurrency gives each.

    .venv/bin/python bench/pool.py [--requests 2000] [--max-tokens 64] [--rounds 5]
                                   [--concurrency 32,64,128,256]

(a) and (b) run in alternating rounds ((a) first in odd rounds); the figure that counts is the
median over the rounds of (b)/(a) of the same round. Target: at least 0.95. All traffic goes to
127.0.0.1.
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

from openai import AsyncOpenAI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.scratch import scratch_database  # noqa: E402
from bench.throughput import wait_until_completed  # noqa: E402
from tests.conftest import free_port, live_worker, start_api, start_watchdog, wait_for  # noqa: E402
from tests.vllm_servers import VllmServer  # noqa: E402

MODEL = "pool-demo"


def requests_file(path: Path, count: int, max_tokens: int) -> list[dict]:
    topics = ["the sea", "a library", "mountains", "trains", "a kitchen", "the moon", "rain", "a garden"]
    lines = [{"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "temperature": 0, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": f"Request {i}: a short story about "
                                                                f"{topics[i % len(topics)]}."}]}}
             for i in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


async def direct(urls: list[str], lines: list[dict], concurrency: int) -> dict:
    """(a): every request straight to a server, `concurrency` at a time per server."""
    clients = [AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) for url in urls]
    limits = [asyncio.Semaphore(concurrency) for _ in urls]

    async def one(i: int, line: dict) -> int:
        async with limits[i % len(urls)]:
            answer = await clients[i % len(urls)].chat.completions.create(**line["body"])
            return answer.usage.completion_tokens

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, line) for i, line in enumerate(lines))))
    seconds = time.perf_counter() - started
    for client in clients:
        await client.close()
    return {"tokens": tokens, "seconds": seconds}


def ours(client, path: Path) -> dict:
    """(b): upload, create, wait with held retrieves, download the output; all of it timed."""
    started = time.perf_counter()
    with open(path, "rb") as source:
        file = client.files.create(file=("requests.jsonl", source), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch, _ = wait_until_completed(client, batch.id)
    output = client.files.content(batch.output_file_id).content
    seconds = time.perf_counter() - started
    assert batch.request_counts.completed == batch.request_counts.total, batch.request_counts
    tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in output.splitlines())
    return {"tokens": tokens, "seconds": seconds}


def rate(result: dict) -> float:
    return result["tokens"] / result["seconds"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", default="32,64,128,256", help="per server, tried for (a)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # rounds show as they end, also into a file
    print(f"{args.requests} chat requests, max_tokens {args.max_tokens}, greedy, two vLLM servers on the demo "
          f"model; {os.cpu_count()} CPUs")
    with scratch_database("pool-") as (data_dir, url, db):
        root = data_dir.parent
        servers = [VllmServer(data_dir, f"bench-{i}", free_port(), served_name=MODEL).start() for i in range(2)]
        api = watchdog = None
        try:
            for server in servers:
                server.wait_ready()
            path = root / "requests.jsonl"
            lines = requests_file(path, args.requests, args.max_tokens)
            urls = [server.url for server in servers]
            asyncio.run(direct(urls, lines[:64], 16))  # warm-up
            tried = {int(c): asyncio.run(direct(urls, lines, int(c))) for c in args.concurrency.split(",")}
            for concurrency, result in tried.items():
                print(f"  (a) at {concurrency:4d} in flight per server: {rate(result):7.0f} tokens/s")
            best = max(tried, key=lambda c: rate(tried[c]))
            print(f"  (a) keeps {best} in flight per server")

            api = start_api(url, data_dir, "api", API_KEY="", OPEN_ACCESS="true")
            slot = {"slot": "pool-0", "engine": "openai-http", "model": MODEL, "backends": urls,
                    "max_in_flight_per_backend": best}
            watchdog = start_watchdog(url, data_dir, "watchdog", [slot], API_KEY="")
            wait_for(lambda: live_worker(db, "pool-0"), 120, interval=0.5, message="pool worker up")
            client = api.client()
            warm = root / "warm.jsonl"
            warm.write_text("".join(json.dumps(line) + "\n" for line in lines[:64]))
            ours(client, warm)

            ratios = []
            for number in range(1, args.rounds + 1):
                result = {}
                for side in ("a", "b") if number % 2 else ("b", "a"):
                    result[side] = asyncio.run(direct(urls, lines, best)) if side == "a" else ours(client, path)
                ratios.append(rate(result["b"]) / rate(result["a"]))
                print(f"  round {number}: (a) {rate(result['a']):7.0f} tokens/s ({result['a']['seconds']:.1f} s)  "
                      f"(b) {rate(result['b']):7.0f} tokens/s ({result['b']['seconds']:.1f} s)  "
                      f"(b)/(a) {ratios[-1]:.2f}")
            print(f"(b)/(a) = {statistics.median(ratios):.2f} median of the rounds' ratios (target >= 0.95); "
                  f"rounds: {', '.join(f'{r:.2f}' for r in ratios)}")
        finally:
            if watchdog is not None:
                watchdog.stop()
            if api is not None:
                api.stop()
            for server in servers:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
