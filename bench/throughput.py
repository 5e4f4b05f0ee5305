"""Generated tokens/s on the same prompts, in one run on one machine:

  (a) raw vLLM in one process at its best settings (LLM.chat over all prompts at once; the
      in-process and multiprocess engine cores are both run and the better one is kept),
  (b) `python -m vllm.entrypoints.openai.run_batch` on the same JSONL, printed with its own
      start-up (as a user running it pays it on every file) and without it: its start-up is
      timed by a second run on a file of one request, and taken off. The (c)/(b) target uses
      (b) without start-up, the figure least kind to us,
  (c) our server end to end: upload -> batch -> output file downloaded, with a worker already
      loaded (as in production, where workers stay up between batches), the client waiting
      for the batch with held retrieves (see wait_until_completed).

    .venv/bin/python bench/throughput.py [--requests 2000] [--max-tokens 128] [--rounds 15]
                                         [--skip-run-batch] [--tools]

With --tools every line offers a function (`tools`, `tool_choice` auto): (a) renders it into the
prompt with LLM.chat(..., tools=...), (b) and our worker run with vLLM's `hermes` tool parser and
automatic tool choice, so (c) takes the path of vLLM's own serving classes (vllm_serving.py).

Greedy decoding makes the three produce the same tokens, so token counts agree. This 2-core machine
varies by +-15% from minute to minute, so every contender is loaded once and stays loaded, and (a)
and (c) then run in rounds of about 15 s each, in an order reversed every round so that a drift
favours neither: multiprocess, in-process, (c); then (c), in-process, multiprocess. (a)'s best
setting is the engine-core mode with the higher median over all rounds; the figure that counts is
the median, over the rounds, of (c) against that (a) of the same round. Taking instead the faster
of the two modes in every round would pick the luckier of two noisy samples (both modes are about
as fast), so it is printed beside it as the stricter bound, with best against best.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cpu import cpu_seconds, postgres_processes  # noqa: E402
from core.batch_app.config import Settings  # noqa: E402
from core.batch_app.database import database_url, migrate, stop_embedded  # noqa: E402
from core.batch_app.demo_model import DEMO_MODEL_NAME, build_demo_model  # noqa: E402
from core.batch_app.domain.batch_format import FINAL_STATUSES  # noqa: E402
from core.batch_app.engines.vllm_engine import vllm_environment  # noqa: E402
from tests.conftest import live_worker, start_api, start_watchdog, wait_for  # noqa: E402

# Loads the model once, warms up, then runs all prompts once per line read from stdin.
RAW_VLLM = """
import json, sys, time
from vllm import LLM, SamplingParams
path, model, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
bodies = [json.loads(line)["body"] for line in open(path)]
conversations, tools = [body["messages"] for body in bodies], bodies[0].get("tools")
llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512)
params = SamplingParams(temperature=0, max_tokens=max_tokens)
llm.chat(conversations[:16], params, use_tqdm=False, tools=tools)  # warm-up, as a loaded worker is warm
print("ready", flush=True)
for _ in sys.stdin:
    started = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False, tools=tools)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)
"""


# The function every line offers with --tools, and the options that parse the model's calls.
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_OPTIONS = {"tool_call_parser": "hermes", "enable_auto_tool_choice": True}


def write_requests(path: Path, count: int, max_tokens: int, tools: bool) -> None:
    topics = ["the sea", "a library", "mountains", "trains", "a kitchen", "the moon", "rain", "a garden"]
    offered = {"tools": [WEATHER], "tool_choice": "auto"} if tools else {}
    with open(path, "w") as out:
        for i in range(count):
            content = f"Request {i}: write a short story about {topics[i % len(topics)]} and number {i * 7919 % 1000}."
            out.write(json.dumps({"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": DEMO_MODEL_NAME, "temperature": 0, "max_tokens": max_tokens,
                                           "messages": [{"role": "user", "content": content}], **offered}}) + "\n")


def vllm_env(root: Path, multiprocessing: bool) -> dict[str, str]:
    env = {**os.environ, **vllm_environment(root / "cache")}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
    return env


class RawVllm:
    """(a): one loaded `LLM` in a process of its own, run on demand."""

    def __init__(self, root: Path, requests: Path, model: Path, max_tokens: int, multiprocessing: bool):
        self.setting = "multiprocess core" if multiprocessing else "in-process core"
        self.log = open(root / f"raw-vllm-{int(multiprocessing)}.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-c", RAW_VLLM, str(requests), str(model), str(max_tokens)],
                                        env=vllm_env(root, multiprocessing), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True)
        self._read_until(lambda line: line == "ready")
        # Frozen between its runs: an idle multiprocess engine core still polls (about 10% of a core).
        os.killpg(self.process.pid, signal.SIGSTOP)

    def run(self) -> dict:
        os.killpg(self.process.pid, signal.SIGCONT)
        try:
            self.process.stdin.write("run\n")
            self.process.stdin.flush()
            return json.loads(self._read_until(lambda line: line.startswith('{"seconds"')))
        finally:
            os.killpg(self.process.pid, signal.SIGSTOP)

    def _read_until(self, wanted) -> str:
        for line in self.process.stdout:
            if wanted(line.strip()):
                return line.strip()
        raise RuntimeError(f"raw vLLM ({self.setting}) exited; see {self.log.name}")

    def close(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)
        self.process.stdin.close()
        self.process.wait(60)
        self.log.close()


def run_batch(root: Path, requests: Path, model: Path, tools: bool) -> dict:
    output_path = root / "run_batch_output.jsonl"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(requests),
                    "-o", str(output_path), "--model", str(model), "--served-model-name", DEMO_MODEL_NAME,
                    "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
                    *(["--tool-call-parser", "hermes", "--enable-auto-tool-choice"] if tools else [])],
                   env=vllm_env(root, multiprocessing=False), capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    lines = [json.loads(line) for line in open(output_path)]
    tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines if line["response"])
    return {"seconds": seconds, "tokens": tokens}


class OurServer:
    """(c): the API server and a watchdog with one loaded vLLM worker, as deployed."""

    def __init__(self, root: Path, requests: Path, url: str, tools: bool):
        from core.batch_app.database import open_database

        self.requests = requests
        self.db = open_database(url, pool_size=1)
        self.api = start_api(url, root / "data", "api", API_KEY="", OPEN_ACCESS="true")
        slot = {"slot": "chat-0", "model": "demo", "engine_options": TOOL_OPTIONS if tools else {}}
        self.watchdog = start_watchdog(url, root / "data", "watchdog", [slot], API_KEY="")
        wait_for(lambda: live_worker(self.db, "chat-0"), 600, interval=0.5, message="worker loaded")
        self.client = self.api.client()
        with open(requests, "rb") as source:
            warm = self.client.files.create(file=("warm.jsonl", b"".join(source.readlines()[:16])), purpose="batch")
        batch = self.client.batches.create(input_file_id=warm.id, endpoint="/v1/chat/completions",
                                           completion_window="24h")
        wait_for(lambda: self.client.batches.retrieve(batch.id).status == "completed", 120, message="warm-up batch")

    def run(self) -> dict:
        client = self.client
        started, started_at = time.perf_counter(), time.time()
        with open(self.requests, "rb") as source:
            file = client.files.create(file=("requests.jsonl", source), purpose="batch")
        uploaded = time.perf_counter() - started
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        created = time.perf_counter() - started
        batch, retrieves = wait_until_completed(client, batch.id)
        seen_completed = time.perf_counter() - started
        output = client.files.content(batch.output_file_id).content
        seconds = time.perf_counter() - started
        assert batch.request_counts.completed == batch.request_counts.total, batch.request_counts
        tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
                     for line in output.splitlines())
        assert tokens == batch.usage.output_tokens
        phases = {"uploaded": uploaded, "created": created, **batch_phases(self.db, batch.id, started_at),
                  "seen completed": seen_completed, "downloaded": seconds, "retrieves": retrieves}
        return {"seconds": seconds, "tokens": tokens, "phases": phases}

    def cpu_seconds(self) -> float:
        """CPU used so far by the API, the watchdog, its worker and PostgreSQL."""
        import psutil

        processes = [psutil.Process(self.api.process.pid), psutil.Process(self.watchdog.process.pid)]
        return cpu_seconds(processes + processes[1].children(recursive=True) + postgres_processes())

    def close(self) -> None:
        self.watchdog.stop()
        self.api.stop()
        self.db.dispose()


def wait_until_completed(client, batch_id: str) -> tuple:
    """Wait as `batchctl submit --wait` does: each retrieve is held by the server (`wait`, up to
    60 s) and answered as soon as the batch ends, so the client neither polls the API (each poll
    costs the API and the database CPU that the engine shares on this machine) nor sees the end
    late, as a polling client does (docs/benchmarks.md)."""
    started, retrieves = time.perf_counter(), 0
    while True:
        batch = client.batches.retrieve(batch_id, extra_query={"wait": 60})
        retrieves += 1
        if batch.status == "completed":
            return batch, retrieves
        if batch.status in FINAL_STATUSES or batch.status == "cancelling":
            raise RuntimeError(f"batch {batch_id} ended {batch.status}: {batch.errors}")
        if time.perf_counter() - started > 600:
            raise TimeoutError(f"batch {batch_id} not completed after 600 s: {batch.request_counts}")


def batch_phases(db, batch_id: str, started_at: float) -> dict[str, float]:
    """When the server reached each stage of a batch, in seconds from `started_at` (epoch)."""
    import sqlalchemy as sa

    with db.connect() as conn:
        row = conn.execute(sa.text(
            "SELECT extract(epoch FROM b.in_progress_at), extract(epoch FROM min(r.claimed_at)),"
            " extract(epoch FROM min(r.finished_at)), extract(epoch FROM max(r.claimed_at)),"
            " extract(epoch FROM max(r.finished_at)), extract(epoch FROM b.finalizing_at),"
            " extract(epoch FROM b.completed_at)"
            " FROM batches b JOIN batch_requests r ON r.batch_id = b.id WHERE b.id = :id"
            " GROUP BY b.id"), {"id": batch_id}).one()
    names = ["in progress", "first claim", "first result", "last claim", "last result", "finalizing",
             "completed"]
    return {name: float(value) - started_at for name, value in zip(names, row, strict=True)}


def rate(result: dict) -> float:
    return result["tokens"] / result["seconds"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=128)
    # Single rounds are noisy here (their ratios' standard deviation is about 0.1): resampled, the
    # median of 9 misses a 0.9 target on noise about twice as often as that of 15 (docs/benchmarks.md).
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--skip-run-batch", action="store_true", help="leave out (b), which takes a minute")
    parser.add_argument("--tools", action="store_true", help="every line offers a function, parsed by `hermes`")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        root = Path(tmp)
        model = build_demo_model(root / "data" / "models" / DEMO_MODEL_NAME)
        requests = root / "requests.jsonl"
        write_requests(requests, args.requests, args.max_tokens, args.tools)
        print(f"{args.requests} chat requests{' offering a function' if args.tools else ''}, max_tokens "
              f"{args.max_tokens}, greedy, demo model; {os.cpu_count()} CPUs")
        settings = Settings(data_dir=root / "data", database_url="")
        url = database_url(settings)
        migrate(url)
        contenders: list = []
        rounds: list[dict] = []
        try:
            # Loaded one after the other, so that no load overlaps another; all idle between their runs.
            # In-process (usually the faster) last: it runs next to (c) whichever way a round is ordered.
            contenders += [RawVllm(root, requests, model, args.max_tokens, multiprocessing=mp) for mp in (True, False)]
            contenders.append(OurServer(root, requests, url, args.tools))
            *raw, ours = contenders
            for number in range(1, args.rounds + 1):
                result, idle_cpu = {}, 0.0
                for contender in (raw + [ours]) if number % 2 else ([ours] + raw[::-1]):
                    if contender is ours:
                        result["c"] = ours.run()
                    else:
                        # Our stack stays up, idle, while (a) runs; what it costs (a) is printed, not hidden.
                        idle_before = ours.cpu_seconds()
                        result[contender.setting] = contender.run() | {"setting": contender.setting}
                        idle_cpu += ours.cpu_seconds() - idle_before
                rounds.append(result)
                print(f"  round {number}: (a) " + "  ".join(f"{r.setting} {rate(result[r.setting]):6.0f}" for r in raw)
                      + f"  (c) {rate(result['c']):6.0f} tokens/s;"
                      f" our idle stack used {idle_cpu:.2f} s CPU during (a)")
                print("    (c) phases, s from upload start: "
                      + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in result["c"]["phases"].items()))
        finally:
            for contender in reversed(contenders):
                contender.close()
            stop_embedded(settings)
        best_setting = max((r.setting for r in raw), key=lambda setting: statistics.median(
            rate(r[setting]) for r in rounds))
        best_mode = [r[best_setting] for r in rounds]
        faster_mode = [max((r[c.setting] for c in raw), key=rate) for r in rounds]
        results = {"a": max(best_mode, key=rate), "c": max((r["c"] for r in rounds), key=rate)}
        if not args.skip_run_batch:
            results["b"] = run_batch(root, requests, model, args.tools)
            first_line = root / "one-request.jsonl"
            first_line.write_text(requests.read_text().splitlines()[0] + "\n")
            start_up = run_batch(root, first_line, model, args.tools)["seconds"]
            results["b0"] = {"tokens": results["b"]["tokens"], "seconds": results["b"]["seconds"] - start_up}

    labels = {"a": f"raw vLLM, LLM.chat ({results['a']['setting']}), best round",
              "b": "vllm run_batch (incl. start-up)", "b0": "vllm run_batch, its start-up (a 1-request run) taken off",
              "c": "our server, upload -> output file, best round"}
    for name in sorted(results):
        print(f"({name}) {labels[name]:62s} {results[name]['tokens']:8d} tokens {results[name]['seconds']:7.2f} s "
              f"{rate(results[name]):8.0f} tokens/s")
    ratios = [rate(r["c"]) / rate(a) for r, a in zip(rounds, best_mode, strict=True)]
    strict = [rate(r["c"]) / rate(a) for r, a in zip(rounds, faster_mode, strict=True)]
    print("(c)/(a) per round: " + ", ".join(f"{x:.2f}" for x in ratios)
          + "; against the faster mode of each round: " + ", ".join(f"{x:.2f}" for x in strict))
    print(f"(c)/(a) = {statistics.median(ratios):.2f} median of the rounds' ratios   (target >= 0.9); "
          f"against the faster mode of each round {statistics.median(strict):.2f}; "
          f"best against best {rate(results['c']) / rate(results['a']):.2f}")
    if "b" in results:
        print(f"(c)/(b) = {rate(results['c']) / rate(results['b0']):.2f} against run_batch without its start-up "
              f"(target >= 1.0); {rate(results['c']) / rate(results['b']):.2f} against run_batch with it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
