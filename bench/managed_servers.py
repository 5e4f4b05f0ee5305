"""How fast the watchdog notices a failed vLLM server of a server slot, and how soon what it held
is answered elsewhere.

    .venv/bin/python bench/managed_servers.py [--heartbeat-timeout 15] [--stall-timeout 10] [--rounds 2]

One stack on this machine: the API, and a watchdog running two vLLM OpenAI servers on the demo
model (server slots srv-0 and srv-1) with the pool worker that feeds them. Each round, in turn:
- crash: srv-0 SIGKILLed while a batch runs;
- stall: srv-1's whole process group SIGSTOPped while it holds requests (caught by the progress
  probe: STALL_TIMEOUT is the shorter clock);
- health: srv-0 SIGSTOPped while idle (no batch: only its failing health checks tell).
For each it prints the detection latency (from the signal to the watchdog's log line naming the
failure), and for the first two the time from the signal to the first stored result of a request
the failed server held (a retried result). Each waits for the server to be back before the next.
HEARTBEAT_INTERVAL is 1 s. All traffic stays on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.scratch import scratch_database  # noqa: E402
from core.batch_app.watchdog.process_control import group_members  # noqa: E402
from tests.conftest import free_port, start_api, start_watchdog, wait_for  # noqa: E402

API_KEY = "sk-bench"
SERVED = "managed-llama"
POOL = f"pool-{SERVED}"
VLLM_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]


def stamp(line: str) -> float:
    return datetime.fromisoformat(line.split(" ", 1)[0]).timestamp()


class Stack:
    def __init__(self, db, log_dir: Path, ports: list[int], client):
        self.db, self.log_dir, self.ports, self.client = db, log_dir, ports, client

    def row(self, slot: str):
        with self.db.connect() as conn:
            return conn.execute(sa.text(
                "SELECT id, pid FROM workers WHERE slot = :s AND status IN ('idle', 'busy') "
                "ORDER BY started_at DESC LIMIT 1"), {"s": slot}).first()

    def held(self, port: int) -> int:
        with self.db.connect() as conn:
            return conn.execute(sa.text(
                "SELECT coalesce(sum(b.in_flight), 0) FROM backends b JOIN workers w ON w.id = b.worker_id "
                "WHERE b.url = :u AND w.status NOT IN ('dead', 'stopped')"),
                {"u": f"http://127.0.0.1:{port}"}).scalar_one()

    def batch(self, count: int):
        lines = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": {"model": SERVED, "max_tokens": 48,
                                              "messages": [{"role": "user", "content": f"About {i}."}]}}).encode()
                         + b"\n" for i in range(count))
        file = self.client.files.create(file=("bench.jsonl", lines), purpose="batch")
        return self.client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")

    def detected(self, slot: str, words: str, after: float) -> float:
        """Seconds from `after` to the watchdog's line saying `slot` failed with `words`."""
        def found():
            for line in (self.log_dir / "watchdog.log").read_text(errors="replace").splitlines():
                if f"server {slot} " in line and words in line and stamp(line) >= after:
                    return stamp(line)
            return None
        return wait_for(found, 300, interval=0.2, message=f"{slot}: {words}") - after

    def first_retried(self, batch_id: str, port: int, after: float) -> float:
        """Seconds from `after` to the first stored result of a request the server on `port` lost
        (NaN when it lost none: a stopped server resumed by the kill's SIGCONT may answer what it
        held before the SIGKILL)."""
        lost = set()
        for line in (self.log_dir / f"worker-{POOL}.log").read_text(errors="replace").splitlines():
            if f"backend http://127.0.0.1:{port} failed request" in line and stamp(line) >= after:
                lost.add(re.search(r"custom_id (\S+)\)", line).group(1))
        with self.db.connect() as conn:
            first = conn.execute(sa.text(
                "SELECT min(extract(epoch FROM finished_at)) FROM batch_requests WHERE batch_id = :b "
                "AND custom_id = ANY(:ids) AND status = 'succeeded'"), {"b": batch_id, "ids": list(lost)}).scalar()
        return float(first) - after if first is not None else float("nan")

    def finish(self, batch_id: str) -> None:
        wait_for(lambda: self.client.batches.retrieve(batch_id).status == "completed", 600, interval=0.5,
                 message="the batch to complete")

    def back(self, slot: str, old_pid: int, port: int) -> None:
        """Restarted, and taken back into the pool (within its health interval)."""
        wait_for(lambda: (row := self.row(slot)) and row.pid != old_pid, 300, interval=0.5, message=f"{slot} back")
        wait_for(lambda: self.pool_state(port) == "healthy", 60, interval=0.5, message=f"{slot} re-admitted")

    def pool_state(self, port: int) -> str | None:
        with self.db.connect() as conn:
            return conn.execute(sa.text(
                "SELECT b.state FROM backends b JOIN workers w ON w.id = b.worker_id "
                "WHERE b.url = :u AND w.status NOT IN ('dead', 'stopped')"), {"u": f"http://127.0.0.1:{port}"}).scalar()


def signal_group(pid: int, signum: int) -> None:
    for member in group_members(pid):
        member.send_signal(signum)


def held_round(stack: Stack, slot: str, port: int, signum: int, words: str) -> tuple[float, float]:
    """`signum` to the server of `slot` while it holds requests of a batch: (detected after,
    first retried result after)."""
    victim = stack.row(slot)
    batch = stack.batch(400)
    wait_for(lambda: stack.held(port) > 0, 120, interval=0.1, message=f"{slot} holding requests")
    at = time.time()
    signal_group(victim.pid, signum)
    detected = stack.detected(slot, words, at)
    stack.finish(batch.id)
    retried = stack.first_retried(batch.id, port, at)
    stack.back(slot, victim.pid, port)
    return detected, retried


def health_round(stack: Stack) -> float:
    victim = stack.row("srv-0")
    at = time.time()
    signal_group(victim.pid, signal.SIGSTOP)
    detected = stack.detected("srv-0", "health check failing", at)
    stack.back("srv-0", victim.pid, stack.ports[0])
    return detected


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heartbeat-timeout", type=float, default=15.0)
    parser.add_argument("--stall-timeout", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    settings_env = {"HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TIMEOUT": str(args.heartbeat_timeout),
                    "STALL_TIMEOUT": str(args.stall_timeout), "RESTART_BACKOFF_MIN": "0.5",
                    "RESTART_BACKOFF_MAX": "1", "SHUTDOWN_GRACE": "10", "MAX_RESTARTS_PER_HOUR": "100",
                    "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    print(f"HEARTBEAT_INTERVAL 1 s, HEARTBEAT_TIMEOUT {args.heartbeat_timeout:g} s, "
          f"STALL_TIMEOUT {args.stall_timeout:g} s, {args.rounds} rounds")
    with scratch_database("managed-servers-") as (data_dir, url, db):
        ports = [free_port(), free_port()]
        slots = [{"slot": f"srv-{i}", "serve": {"model": "demo", "served_name": SERVED, "port": port,
                                                "args": VLLM_ARGS}} for i, port in enumerate(ports)]
        api = start_api(url, data_dir, "api", API_KEY=API_KEY)
        watchdog = start_watchdog(url, data_dir, "watchdog", slots, API_KEY=API_KEY, **settings_env)
        stack = Stack(db, watchdog.log_dir, ports, api.client(API_KEY))
        try:
            for slot in ("srv-0", "srv-1", POOL):
                wait_for(lambda: stack.row(slot), 600, interval=0.5, message=f"{slot} up")
            results = {"crash": [], "stall": [], "health": []}
            for round_ in range(1, args.rounds + 1):
                results["crash"].append(held_round(stack, "srv-0", ports[0], signal.SIGKILL, "killed by SIGKILL"))
                results["stall"].append(held_round(stack, "srv-1", ports[1], signal.SIGSTOP, "no request completed"))
                results["health"].append((health_round(stack), float("nan")))
                for kind, values in results.items():
                    detected, retried = values[-1]
                    print(f"round {round_} {kind:7} detected after {detected:6.2f} s"
                          + (f", first retried result {retried:6.2f} s after the signal" if retried == retried else ""))
            print("medians:")
            for kind, values in results.items():
                detected = statistics.median(v[0] for v in values)
                retried = [v[1] for v in values if v[1] == v[1]]
                print(f"  {kind:7} detected {detected:6.2f} s"
                      + (f", first retried result {statistics.median(retried):6.2f} s" if retried else ""))
        finally:
            watchdog.stop()
            api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
