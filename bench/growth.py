"""Months of batches on one database: what finished batches leave behind, and whether the queue
stays as fast as on a fresh database.

    .venv/bin/python bench/growth.py [--rounds 10] [--requests 20000] [--compare 2] [--probe-rounds 3]

A stack (API and a watchdog with one worker on `tests.engines:InstantEngine`, as in
bench/queue_ceiling.py) on an embedded PostgreSQL runs ROUNDS batches of REQUESTS requests one
after another, as a user runs them (upload, create, held retrieve, download), with retention as
shipped (a finished batch's request rows deleted a few seconds after its end, while the next
batch runs). Then, in the same run:
- bytes that request rows still hold per finished request, against an output line's size;
- the queue's run phase (first claim to last result) on the grown database against a fresh one
  (a new database and stack per round), alternating, COMPARE rounds each;
- every file deleted through the API: the database's size (after VACUUM FULL) against its size
  when it was new;
- claims' latency (claim 64 requests and store their results, on a connection of this process)
  while retention deletes the rows of a finished 20,000-request batch, against the same claims
  with nothing else running, alternating, PROBE_ROUNDS rounds each.
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

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.queue_ceiling import ANSWER, Stack, input_file  # noqa: E402
from bench.queue_protocols import fill_queue  # noqa: E402
from bench.scratch import scratch_database  # noqa: E402
from core.batch_app.config import Settings  # noqa: E402
from core.batch_app.database import migrate, open_database  # noqa: E402
from core.batch_app.domain import queue, registry  # noqa: E402
from core.batch_app.domain.queue import Completion  # noqa: E402
from core.batch_app.watchdog.retention import Retention  # noqa: E402

# Retention as shipped, but a finished batch's rows are kept a few seconds: long enough for this
# bench to read when each of its phases happened.
RETENTION = {"FINISHED_REQUESTS_RETENTION": "3", "RETENTION_INTERVAL": "2"}
PROBE_MODEL, PROBE_CLAIM = "probe", 64


def database_size(db) -> int:
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM FULL"))
        return conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar()


def new_database(url: str, name: str) -> str:
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    fresh = sa.engine.make_url(url).set(database=name).render_as_string(hide_password=False)
    migrate(fresh)
    return fresh


def held_per_request(db) -> tuple[float, float, int]:
    """(bytes of request rows of finished batches per finished request, bytes of an output line,
    finished requests)."""
    with db.connect() as conn:
        finished = conn.execute(sa.text(
            "SELECT coalesce(sum(total), 0) FROM batches WHERE status = 'completed'")).scalar()
        held = conn.execute(sa.text(
            "SELECT coalesce(sum(pg_column_size(r.*)), 0) FROM batch_requests r JOIN batches b ON b.id = r.batch_id "
            "WHERE b.status IN ('completed', 'failed', 'expired', 'cancelled')")).scalar()
        output = conn.execute(sa.text(
            "SELECT sum(octet_length(c.data)) FROM files f JOIN file_chunks c ON c.file_id = f.id "
            "WHERE f.purpose = 'batch_output'")).scalar()
    return held / finished, output / finished, finished


def wait_pruned(db, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.connect() as conn:
            if not conn.execute(sa.text("SELECT count(*) FROM batches WHERE requests_pruned_at IS NULL "
                                        "AND status = 'completed'")).scalar():
                return
        time.sleep(1)
    raise RuntimeError("retention did not delete the finished batches' rows")


def claim_latencies(db, seconds: float) -> list[float]:
    """Seconds of each claim of PROBE_CLAIM requests (each then stored) for `seconds`."""
    worker_id = str(uuid.uuid4())
    with db.begin() as conn:
        registry.register_worker(conn, worker_id=worker_id, slot="probe", host="bench", pid=1, model=PROBE_MODEL,
                                 gpu_ids="")
    latencies, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        with db.begin() as conn:
            claimed = queue.claim(conn, worker_id, PROBE_MODEL, PROBE_CLAIM, engine_idle=False, max_attempts=3)
        latencies.append(time.perf_counter() - started)
        if not claimed:
            raise RuntimeError("the probe's queue ran dry")
        with db.begin() as conn:
            queue.complete(conn, worker_id, [Completion(r.id, r.attempt, 200, ANSWER, 1, 1) for r in claimed])
    return latencies


def finished_batch(db, count: int) -> str:
    """A batch of `count` requests that ended a while ago, its rows still there."""
    batch_id = fill_queue(db, count, "finished")
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE batch_requests SET status = 'succeeded', response = :r, finished_at = now() "
                             "WHERE batch_id = :b"), {"b": batch_id, "r": json.dumps(ANSWER)})
        conn.execute(sa.text("UPDATE batches SET status = 'completed', completed_at = now() - interval '1 hour' "
                             "WHERE id = :b"), {"b": batch_id})
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE batch_requests"))
    return batch_id


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--compare", type=int, default=2)
    parser.add_argument("--probe-rounds", type=int, default=3)
    args = parser.parse_args()
    data = input_file(args.requests)
    with scratch_database("growth-") as (data_dir, url, db):
        new_size = database_size(db)
        grown = Stack(data_dir, url, 1, env=RETENTION)
        try:
            rates = []
            for round_ in range(args.rounds):
                rates.append(grown.run(data)["run"]["rate"])
                print(f"  batch {round_ + 1}/{args.rounds}: run {rates[-1]:,.0f}/s", flush=True)
            wait_pruned(db)
            held, output_line, finished = held_per_request(db)
            print(f"request rows hold {held:.1f} bytes per finished request ({finished:,} requests); "
                  f"an output line is {output_line:.0f} bytes: {held / output_line:.3f} of one")
            compared: dict[str, list[float]] = {"grown": [], "fresh": []}
            for round_ in range(args.compare):
                for side in (("grown", "fresh") if round_ % 2 == 0 else ("fresh", "grown")):
                    if side == "grown":
                        compared[side].append(grown.run(data)["run"]["rate"])
                    else:
                        fresh_url = new_database(url, f"fresh_{round_}")
                        fresh = Stack(data_dir / f"fresh-{round_}", fresh_url, 1, env=RETENTION)
                        try:
                            compared[side].append(fresh.run(data)["run"]["rate"])
                        finally:
                            fresh.close()
                    print(f"  round {round_ + 1}: {side} run {compared[side][-1]:,.0f}/s", flush=True)
            grown_rate, fresh_rate = statistics.median(compared["grown"]), statistics.median(compared["fresh"])
            print(f"run phase, median of {args.compare}: grown {grown_rate:,.0f}/s, fresh {fresh_rate:,.0f}/s: "
                  f"grown/fresh {grown_rate / fresh_rate:.2f}")
            with db.connect() as conn:
                files = conn.execute(sa.text("SELECT pg_total_relation_size('file_chunks')")).scalar()
            print(f"files on disk (input and output, compressed): {files / finished:.0f} bytes per request")
            for file in grown.client.files.list(limit=10_000).data:
                grown.client.files.delete(file.id)
            wait_pruned(db)
        finally:
            grown.close()
        end_size = database_size(db)
        print(f"database after every file is deleted: {end_size / 2**20:.2f} MiB, new {new_size / 2**20:.2f} MiB: "
              f"{(end_size - new_size) / 2**20:.2f} MiB left")

        probe_db = open_database(new_database(url, "probe"), pool_size=2)
        fill_queue(probe_db, 200_000, PROBE_MODEL)
        settings = Settings(finished_requests_retention=0, retention_interval=3600)
        latencies: dict[str, list[float]] = {"idle": [], "pruning": []}
        for round_ in range(args.probe_rounds):
            for side in (("idle", "pruning") if round_ % 2 == 0 else ("pruning", "idle")):
                if side == "idle":
                    latencies[side] += claim_latencies(probe_db, 3)
                    continue
                finished_batch(probe_db, 20_000)
                if not latencies["pruning"]:  # once
                    with probe_db.connect() as conn:
                        row = conn.execute(sa.text("SELECT avg(pg_column_size(r.*)) FROM batch_requests r "
                                                   "WHERE status = 'succeeded'")).scalar()
                    print(f"  a finished request's row before retention: {row:.0f} bytes (without its indexes)")
                pruner = threading.Thread(target=Retention(probe_db, settings).run_round)
                pruner.start()
                started = time.monotonic()
                while pruner.is_alive():
                    latencies[side] += claim_latencies(probe_db, 0.5)
                print(f"  round {round_ + 1}: pruned 20,000 rows in {time.monotonic() - started:.1f} s", flush=True)
        probe_db.dispose()
        idle, pruning = p99(latencies["idle"]), p99(latencies["pruning"])
        print(f"claim of {PROBE_CLAIM} (+ store) p99: idle {1000 * idle:.1f} ms ({len(latencies['idle'])} claims), "
              f"while pruning {1000 * pruning:.1f} ms ({len(latencies['pruning'])} claims): {pruning / idle:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
