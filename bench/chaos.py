"""A chaos run anyone can repeat: a stack with two real vLLM chat workers runs one large batch
while its workers are SIGKILLed (each time the whole process group, EngineCore included) at
random moments and its PostgreSQL is stopped twice for 10 to 30 s, all drawn uniformly over the
first `--spread` seconds of the batch (which runs longer than that). At the end it prints what a
user and an operator care about:

    kills, outages, restarts charged, requests lost, requests duplicated, error lines, wall time

    .venv/bin/python bench/chaos.py [--requests 5000] [--kills 20] [--outages 2] [--spread 420]
                                    [--in-flight 32] [--seed N] [--max-attempts 3]

Target: 0 lost, 0 duplicated, 0 error lines, and every restart charged to a kill (none to an
outage). HEARTBEAT_TIMEOUT is 10 s here, so each outage outlasts it: the run shows that an outage
is not mistaken for hung workers. Every loop is bounded in count and time; all traffic stays on
this machine (the stack listens on 127.0.0.1, PostgreSQL on a Unix socket).

A request in flight on MAX_ATTEMPTS workers that crashed, the last time running alone, fails as
a poison request. The kills here are SIGKILLs from outside with no OOM kill, which say nothing of
the requests: those run again (`requests run again`) without being charged a crash (`requests
charged a crash` counts the ones that were). `--max-attempts` sets MAX_ATTEMPTS (3 by default);
error lines are broken down by code.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

from bench.scratch import scratch_database  # noqa: E402
from core.batch_app.domain.batch_format import FINAL_STATUSES  # noqa: E402
from tests.conftest import live_worker, start_api, start_watchdog, wait_for  # noqa: E402

SLOT_NAMES = ("chat-0", "chat-1")
LIVENESS = dict(HEARTBEAT_INTERVAL="2", HEARTBEAT_TIMEOUT="10", MAX_RESTARTS_PER_HOUR="1000",
                RESTART_BACKOFF_MIN="0.5", RESTART_BACKOFF_MAX="2", API_KEY="")
# Longest the whole run may take, chaos and the batch's end included.
TIME_LIMIT = 3600


def write_requests(path: Path, count: int, max_tokens: int) -> None:
    with open(path, "w") as file:
        for i in range(count):
            file.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
                "model": "demo-tiny-llama", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"Tell me about item {i}."}]}}) + "\n")


def database(data_dir: Path, action: str) -> None:
    """The project's own command, as an operator would stop and start the embedded server."""
    env = {**os.environ, "DATA_DIR": str(data_dir), "DATABASE_URL": ""}
    subprocess.run([sys.executable, "-m", "core.batch_app.database", action], env=env, cwd=REPO, check=True,
                   capture_output=True, timeout=120)


def chaos_plan(rng: random.Random, kills: int, outages: int, spread: float) -> list[tuple[float, str]]:
    """(seconds after the batch was created, event), uniformly over `spread` seconds, in time order."""
    return sorted([(rng.uniform(5, spread), "kill") for _ in range(kills)]
                  + [(rng.uniform(5, spread), "outage") for _ in range(outages)])


def kill_a_worker(rng: random.Random, db, killed: set[int]) -> str | None:
    """SIGKILL the process group of a random serving worker; its pid, or None if none serves (one
    killed already but not yet seen dead by the watchdog does not count)."""
    serving = [row for slot in SLOT_NAMES if (row := live_worker(db, slot)) and row.pid not in killed]
    if not serving:
        return None
    victim = rng.choice(serving)
    try:
        os.killpg(victim.pid, signal.SIGKILL)  # the worker leads its own group: EngineCore goes too
    except ProcessLookupError:
        return None
    killed.add(victim.pid)
    return f"{victim.pid}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--outages", type=int, default=2)
    parser.add_argument("--spread", type=float, default=420.0, help="seconds over which the events are drawn")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=32, help="requests each worker keeps in its engine")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"chaos: {args.requests} chat requests (max_tokens {args.max_tokens}), two vLLM workers, "
          f"{args.in_flight} in flight each, {args.kills} kills and {args.outages} outages of 10-30 s over "
          f"{args.spread:.0f} s, MAX_ATTEMPTS {args.max_attempts}, seed {seed}")
    with scratch_database("chaos-", pool_size=2) as (data_dir, url, db):
        root = data_dir.parent
        api = start_api(url, data_dir, "api", API_KEY="", OPEN_ACCESS="true")
        slots = [{"slot": name, "model": "demo", "max_in_flight": args.in_flight} for name in SLOT_NAMES]
        watchdog = start_watchdog(url, data_dir, "watchdog", slots, MAX_ATTEMPTS=str(args.max_attempts), **LIVENESS)
        try:
            for name in SLOT_NAMES:
                wait_for(lambda: live_worker(db, name), 600, interval=1, message=f"{name} loaded")
            client = api.client().with_options(max_retries=5)
            requests = root / "requests.jsonl"
            write_requests(requests, args.requests, args.max_tokens)
            started = time.monotonic()
            with open(requests, "rb") as source:
                file = client.files.create(file=("chaos.jsonl", source), purpose="batch")
            batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            kills, outages, killed = 0, [], set()
            for at, event in chaos_plan(rng, args.kills, args.outages, args.spread):
                time.sleep(max(0.0, at - (time.monotonic() - started)))  # events that fall due together follow at once
                if time.monotonic() - started > TIME_LIMIT:
                    break
                if event == "kill":
                    victim = wait_for(lambda: kill_a_worker(rng, db, killed), 600, interval=0.5,
                                      message="a serving worker")
                    kills += 1
                    print(f"  {time.monotonic() - started:6.1f} s: kill {kills} (pid {victim})", flush=True)
                else:
                    seconds = rng.uniform(10, 30)
                    database(data_dir, "stop")
                    print(f"  {time.monotonic() - started:6.1f} s: database stopped for {seconds:.0f} s", flush=True)
                    time.sleep(seconds)
                    database(data_dir, "start")
                    outages.append(seconds)
            done = wait_for(lambda: (b := _retrieve(client, batch.id)) and b.status in FINAL_STATUSES and b,
                            TIME_LIMIT, interval=2, message="the batch to end")
            wall = time.monotonic() - started
            report(client, db, done, args.requests, kills, outages, wall, watchdog.log_dir)
        finally:
            watchdog.stop()
            api.stop()
    return 0


def _retrieve(client, batch_id: str):
    try:
        return client.batches.retrieve(batch_id)
    except Exception:  # the API answers 503 while the database is down
        return None


def report(client, db, batch, total: int, kills: int, outages: list[float], wall: float, log_dir: Path) -> None:
    lines = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            lines += [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    seen = [line["custom_id"] for line in lines]
    lost = total - len(set(seen))
    duplicated = len(seen) - len(set(seen))
    errors = Counter((line["error"] or {}).get("code") or f"HTTP {line['response']['status_code']}"
                     for line in lines if line["error"] or line["response"]["status_code"] != 200)
    with db.connect() as conn:
        charged = conn.execute(sa.text("SELECT count(*) FROM worker_restarts WHERE reason <> 'reset'")).scalar()
        reruns, charged_a_crash = conn.execute(sa.text(
            "SELECT count(*) FILTER (WHERE attempt > 1), count(*) FILTER (WHERE crashes > 0) "
            "FROM batch_requests WHERE batch_id = :b"), {"b": batch.id}).one()
    log_errors = [line for path in sorted(log_dir.glob("*.log")) for line in path.read_text(errors="replace").splitlines()
                  if re.search(r" (ERROR|CRITICAL) ", line) and "database unreachable while" not in line]
    print(f"batch {batch.status}: {batch.request_counts.completed} completed, {batch.request_counts.failed} failed")
    print(f"kills                 {kills}")
    print(f"outages               {len(outages)} ({', '.join(f'{s:.0f} s' for s in outages) or 'none'})")
    print(f"restarts charged      {charged} (to kills: {min(charged, kills)}, beyond the kills: {max(0, charged - kills)})")
    print(f"requests run again    {reruns} (charged a crash: {charged_a_crash})")
    print(f"requests lost         {lost}")
    print(f"requests duplicated   {duplicated}")
    print(f"error lines           {sum(errors.values())}"
          + (f" ({', '.join(f'{code}: {n}' for code, n in errors.most_common())})" if errors else ""))
    print(f"log lines at ERROR    {len(log_errors)} (besides the outages' own notices)")
    for line in log_errors[:10]:
        print(f"    {line[:200]}")
    print(f"wall time             {wall:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
