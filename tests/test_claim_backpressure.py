"""A worker whose results cannot be stored stops claiming past 10,000 of them, and loses none.

README: "workers go on generating what they hold and keep finished results in memory until they
can be stored (past 10,000 waiting results a worker stops claiming; it never drops one)". The
limit is `RunnerOptions.max_unstored` (core/batch_app/worker/runner.py), which no setting changes,
so the test runs past the real 10,000: a real worker process (the instant test engine, which
answers all it holds at each step) on a database of the module's own, whose result writer the
test blocks by locking `batch_progress`, the table every stored result is counted into and
which a claim never touches. Claims go on meanwhile (they take `batch_requests` rows with
SKIP LOCKED); only the unstored results hold the worker back.
"""

from __future__ import annotations

import json
import re

import sqlalchemy as sa

from .conftest import database_of_the_module, live_worker, running_watchdog, wait_for, wait_for_batch
from .jsonl import request_line, submit

MODEL = "backpressure-instant"
SLOT = "backpressure-0"
LIMIT = 10_000  # RunnerOptions.max_unstored, README's "past 10,000 waiting results"
WINDOW = 500  # the worker's in-flight window: it claims 500 at a time
TOTAL = LIMIT + 2 * WINDOW
database, db, api = database_of_the_module("backpressure")  # the test locks a table every writer needs


def _counts(db, batch_id: str) -> dict[str, int]:
    """The batch's requests by status."""
    with db.connect() as conn:
        return dict(conn.execute(sa.text("SELECT status, count(*) FROM batch_requests WHERE batch_id = :b "
                                         "GROUP BY status"), {"b": batch_id}).all())


def _worker_row(db, worker_id: str):
    """What the worker's latest heartbeat says."""
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT status, in_flight, last_seen FROM workers WHERE id = :w"),
                            {"w": worker_id}).one()


def test_a_worker_stops_claiming_while_10000_results_wait_to_be_stored_and_resumes_losing_none(
        database, data_dir, db, api):
    client = api.client()
    slot = {"slot": SLOT, "model": f"/models/{MODEL}", "served_name": MODEL,
            "engine": "tests.engines:InstantEngine", "max_in_flight": WINDOW}
    with running_watchdog(database, data_dir, "watchdog-backpressure", [slot], HEARTBEAT_INTERVAL="0.5",
                          SHUTDOWN_GRACE="10") as watchdog:
        worker = wait_for(lambda: live_worker(db, SLOT), 60, message="worker up")
        with db.connect() as locker, locker.begin():
            # Every result the worker stores is counted into batch_progress in the same statement:
            # with the table locked, its result writer waits, and its results pile up in memory.
            locker.execute(sa.text("LOCK TABLE batch_progress IN SHARE MODE"))
            batch = submit(client, [request_line(f"r{i}", MODEL) for i in range(TOTAL)])

            def paused():
                counts, row = _counts(db, batch.id), _worker_row(db, worker.id)
                # Its engine is empty (the heartbeat says so) with more than the limit claimed.
                return counts.get("running", 0) >= LIMIT and row.status == "idle" and row.in_flight == 0 and row
            seen = wait_for(paused, 120, message="the worker to claim past the limit and run dry")
            claimed = _counts(db, batch.id)
            # The worker's loop looks for work every quarter second while idle; three more
            # heartbeats of its own are several of its looks, each of which would have claimed.
            for _ in range(3):
                last = seen.last_seen
                seen = wait_for(lambda: (row := _worker_row(db, worker.id)).last_seen > last and row, 30,
                                message="the worker's next heartbeat")
            held = _counts(db, batch.id)
            assert held == claimed, (claimed, held)  # nothing claimed meanwhile
            assert LIMIT <= held["running"] < LIMIT + WINDOW  # stopped at the first claim past the limit
            assert held["queued"] == TOTAL - held["running"] > 0  # the rest waits in the queue
            assert "succeeded" not in held  # the writer is held: nothing was stored
            assert watchdog.process.poll() is None and live_worker(db, SLOT).pid == worker.pid
        # The lock is released: the worker stores what it kept, claims again and ends the batch.

        done = wait_for_batch(client, batch.id, 300)
        assert done.status == "completed", done
        assert done.request_counts.completed == done.request_counts.total == TOTAL
        assert done.request_counts.failed == 0 and done.error_file_id is None
        lines = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
        custom_ids = [line["custom_id"] for line in lines]
        assert len(custom_ids) == len(set(custom_ids)) == TOTAL  # every custom_id exactly once
        assert set(custom_ids) == {f"r{i}" for i in range(TOTAL)}
        assert {line["response"]["status_code"] for line in lines} == {200}
        with db.connect() as conn:
            attempts = conn.execute(sa.text("SELECT min(attempt), max(attempt) FROM batch_requests "
                                            "WHERE batch_id = :b"), {"b": batch.id}).one()
        assert tuple(attempts) == (1, 1)  # nothing handed back or run twice
        assert live_worker(db, SLOT).pid == worker.pid  # the same worker, never restarted

    # The same worker claimed every request, the rest only after the pause.
    log = (watchdog.log_dir / f"worker-{SLOT}.log").read_text()
    claims = [int(n) for n in re.findall(rf"claimed (\d+) requests \(batches {batch.id}\)", log)]
    assert sum(claims) == TOTAL and max(claims) <= WINDOW
