"""The queue's own ceiling: requests/s end to end and per phase, with an engine that answers at once.

    .venv/bin/python bench/queue_ceiling.py [--requests 20000,100000] [--workers 1,2,4] [--rounds 2]

For each worker count, a stack on an embedded PostgreSQL: the API and a watchdog running that
many workers of one model on `tests.engines:InstantEngine` (set as each slot's engine, as
`ENGINE=` sets it), which answers every request it holds at its next step. For each size, one
batch, as a user runs it: upload -> create -> completed (a held retrieve) -> output downloaded.
Phases: ingest (the upload's start to the batch in progress: upload, validation, COPY), run
(first claim to last result stored, the database's own timestamps), output (last result to the
client's held retrieve answering `completed`: the output file built), download (the output file). A sampler reads the CPU time of PostgreSQL's
processes and of ours every 0.1 s, so each phase shows PostgreSQL's share of the 2 cores.

Baseline, in the same rounds (alternating with ours): the run phase's own statements alone, one
claim of the workers' window (1024) and its results stored in groups of the result writer's
size (512), back to back on one connection of this process, with nothing else running: what
PostgreSQL gives the claim-and-store protocol here, and so the ceiling one worker can approach.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cpu import cpu_seconds, postgres_processes  # noqa: E402
from bench.queue_protocols import fill_queue  # noqa: E402
from bench.scratch import scratch_database  # noqa: E402
from bench.throughput import batch_phases, wait_until_completed  # noqa: E402
from core.batch_app.database import open_database  # noqa: E402
from core.batch_app.domain import queue, registry  # noqa: E402
from core.batch_app.domain.queue import Completion  # noqa: E402
from tests.conftest import start_api, start_watchdog, wait_for  # noqa: E402

MODEL = "instant"
BASELINE_MODEL = "instant-baseline"  # a model of its own: the stack's workers leave its requests alone
WINDOW, GROUP = 1024, 512  # InstantEngine's window, ResultWriter's max_group
ANSWER = {"object": "chat.completion", "model": MODEL, "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                                "total_tokens": 2},
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Say something about r1."},
                       "finish_reason": "stop"}]}


def input_file(count: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": MODEL, "max_tokens": 8,
                                         "messages": [{"role": "user", "content": f"Say something about r{i}."}]}
                                }).encode() + b"\n" for i in range(count))


class CpuSampler(threading.Thread):
    """CPU seconds of PostgreSQL and of our processes, read every 0.1 s with the time of reading.
    A process that exits keeps its last reading (PostgreSQL's autovacuum workers come and go)."""

    def __init__(self, ours: list[psutil.Process]):
        super().__init__(daemon=True)
        self.ours, self.samples, self.stopping = ours, [], threading.Event()
        self._last: dict[tuple[str, int], float] = {}

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            ours = self.ours + [child for process in self.ours for child in process.children(recursive=True)]
            for side, processes in (("pg", postgres_processes()), ("ours", ours)):
                for process in processes:
                    self._last[side, process.pid] = max(self._last.get((side, process.pid), 0.0),
                                                        cpu_seconds([process]))
            self.samples.append((time.time(), sum(v for (side, _), v in self._last.items() if side == "pg"),
                                 sum(v for (side, _), v in self._last.items() if side == "ours")))

    def between(self, start: float, end: float) -> tuple[float, float]:
        """(PostgreSQL's, ours) CPU seconds from `start` to `end` (epoch), to the nearest sample."""
        def at(moment: float) -> tuple[float, float]:
            sample = min(self.samples, key=lambda s: abs(s[0] - moment))
            return sample[1], sample[2]

        (pg0, ours0), (pg1, ours1) = at(start), at(end)
        return pg1 - pg0, ours1 - ours0


class Stack:
    def __init__(self, root: Path, url: str, workers: int, env: dict[str, str] | None = None):
        slots = [{"slot": f"instant-{i}", "model": f"/models/{MODEL}", "served_name": MODEL,
                  "engine": "tests.engines:InstantEngine"} for i in range(workers)]
        self.db = open_database(url, pool_size=1)
        self.api = start_api(url, root, f"api-{workers}", API_KEY="", OPEN_ACCESS="true", MAX_FILE_LINES="1000000")
        self.watchdog = start_watchdog(url, root, f"watchdog-{workers}", slots, API_KEY="", **(env or {}))
        self.client = self.api.client()
        wait_for(lambda: self._live() == workers, 120, interval=0.5, message="workers up")
        self.sampler = CpuSampler([psutil.Process(self.api.process.pid), psutil.Process(self.watchdog.process.pid)])
        self.sampler.start()

    def _live(self) -> int:
        with self.db.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM workers WHERE status IN ('idle', 'busy')")).scalar()

    def run(self, data: bytes) -> dict:
        started = time.time()
        file = self.client.files.create(file=("requests.jsonl", data), purpose="batch")
        batch = self.client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                           completion_window="24h")
        batch, _ = wait_until_completed(self.client, batch.id)
        seen = time.time() - started
        output = self.client.files.content(batch.output_file_id).content
        ended = time.time() - started
        assert batch.request_counts.completed == batch.request_counts.total == output.count(b"\n")
        at = batch_phases(self.db, batch.id, started)
        # The output phase ends when the client sees the batch completed: the database stamps
        # completed_at with the start of the transaction that builds the file.
        bounds = {"ingest": (0, at["in progress"]), "run": (at["first claim"], at["last result"]),
                  "output": (at["last result"], seen), "download": (seen, ended), "end to end": (0, ended)}
        phases = {}
        for name, (start, end) in bounds.items():
            pg, ours = self.sampler.between(started + start, started + end)
            seconds = end - start
            phases[name] = {"seconds": seconds, "rate": batch.request_counts.total / seconds,
                            "pg_share": pg / seconds / psutil.cpu_count(), "ours_share": ours / seconds / psutil.cpu_count()}
        return phases

    def close(self) -> None:
        self.sampler.stopping.set()
        self.watchdog.stop()
        self.api.stop()
        self.db.dispose()


def baseline(db, count: int) -> dict:
    """Claim and store `count` queued requests with the run phase's statements alone."""
    fill_queue(db, count, BASELINE_MODEL)
    worker_id = str(uuid.uuid4())
    with db.begin() as conn:
        registry.register_worker(conn, worker_id=worker_id, slot="baseline", host="bench", pid=1,
                                 model=BASELINE_MODEL, gpu_ids="")
    pg_before, started = cpu_seconds(postgres_processes()), time.perf_counter()
    while True:
        with db.begin() as conn:
            claimed = queue.claim(conn, worker_id, BASELINE_MODEL, WINDOW, engine_idle=False, max_attempts=3)
        if not claimed:
            break
        for i in range(0, len(claimed), GROUP):
            with db.begin() as conn:
                queue.complete(conn, worker_id, [Completion(id=r.id, attempt=r.attempt, status_code=200,
                                                            response=ANSWER, prompt_tokens=1, completion_tokens=1)
                                                 for r in claimed[i:i + GROUP]])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rate": count / seconds,
            "pg_share": (cpu_seconds(postgres_processes()) - pg_before) / seconds / psutil.cpu_count()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", default="20000,100000")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sizes = [int(n) for n in args.requests.split(",")]
    counts = [int(n) for n in args.workers.split(",")]
    files = {size: input_file(size) for size in sizes}
    results: dict[tuple, list[dict]] = {}
    with scratch_database("queue-ceiling-") as (data_dir, url, db):
        for workers in counts:
            stack = Stack(data_dir, url, workers)
            try:
                stack.run(files[sizes[0]][: files[sizes[0]].index(b"\n", 100_000) + 1])  # warm-up
                for round_ in range(args.rounds):
                    for size in sizes:
                        contenders = [("baseline", lambda: {"run": baseline(db, size)}),
                                      ("ours", lambda: stack.run(files[size]))]
                        for name, run in (contenders if round_ % 2 == 0 else contenders[::-1]):
                            if name == "baseline" and workers != counts[0]:
                                continue  # the baseline has no workers: measured with the first stack only
                            results.setdefault((name, workers, size), []).append(run())
                            print(f"  round {round_ + 1}: {name} {workers} workers, {size} requests: "
                                  + ", ".join(f"{phase} {r['rate']:,.0f}/s (PostgreSQL {100 * r['pg_share']:.0f} %)"
                                              for phase, r in results[name, workers, size][-1].items()),
                                  flush=True)
            finally:
                stack.close()
        storage = storage_per_request(db)
    print(f"\nmedian of {args.rounds} rounds; requests/s (PostgreSQL's share of {psutil.cpu_count()} cores, ours)")
    for size in sizes:
        base = statistics.median(r["run"]["rate"] for r in results["baseline", counts[0], size])
        print(f"{size:>7} requests, baseline (claim + store statements alone): run {base:,.0f}/s")
        for workers in counts:
            runs = results["ours", workers, size]
            line = []
            for phase in ("ingest", "run", "output", "download", "end to end"):
                rate = statistics.median(r[phase]["rate"] for r in runs)
                pg = statistics.median(r[phase]["pg_share"] for r in runs)
                ours = statistics.median(r[phase]["ours_share"] for r in runs)
                line.append(f"{phase} {rate:,.0f}/s ({100 * pg:.0f} %, {100 * ours:.0f} %)")
            run = statistics.median(r["run"]["rate"] for r in runs)
            print(f"{'':>7}   ours, {workers} workers: " + ", ".join(line) + f"; run/baseline {run / base:.2f}")
    print("storage: " + ", ".join(f"{name} {value:,.0f} bytes" for name, value in storage.items()))
    return 0


def storage_per_request(db) -> dict[str, float]:
    """What the batches above left on disk, per request: its row (with indexes and TOAST), and
    the input and output files' stored contents (the files are ours alone: the baseline has none)."""
    with db.connect() as conn:
        requests = conn.execute(sa.text("SELECT count(*) FROM batch_requests")).scalar()
        ours = conn.execute(sa.text("SELECT count(*) FROM batch_requests WHERE model = :m"), {"m": MODEL}).scalar()
        rows = conn.execute(sa.text("SELECT pg_total_relation_size('batch_requests')")).scalar()
        by_purpose = dict(conn.execute(sa.text(
            "SELECT f.purpose, sum(octet_length(c.data)) FROM files f JOIN file_chunks c ON c.file_id = f.id "
            "GROUP BY f.purpose")).all())
        chunks = conn.execute(sa.text("SELECT pg_total_relation_size('file_chunks')")).scalar()
    return {"request row": rows / requests, "input line": by_purpose.get("batch", 0) / ours,
            "output line": by_purpose.get("batch_output", 0) / ours,
            "stored files on disk (input + output)": chunks / ours}


if __name__ == "__main__":
    sys.exit(main())
