"""Workers hear through LISTEN/NOTIFY on a real PostgreSQL when requests are queued or taken away."""

from __future__ import annotations

import logging
import time

import sqlalchemy as sa

from core.batch_app.domain import queue
from core.batch_app.worker.work_signal import WorkSignal

from .conftest import wait_for
from .jsonl import request_line, submit
from .simulated_worker import claim, new_worker


def quiet_signal(db) -> WorkSignal:
    """A listener with the wake-ups of earlier tests already consumed."""
    signal = WorkSignal(db)
    while signal.wait(0.2):
        pass
    return signal


def test_a_new_batch_wakes_an_idle_worker(client, db, own_model):
    signal = quiet_signal(db)
    submit(client, [request_line("a", own_model)])
    started = time.monotonic()
    assert signal.wait(30)
    assert time.monotonic() - started < 5  # woken by the notification, not at the end of the wait
    signal.close()


def test_released_requests_wake_workers_and_a_rollback_wakes_none(client, db, own_model):
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(2)])
    worker = new_worker(db, own_model)
    claimed = claim(db, worker, own_model, 2)
    signal = quiet_signal(db)
    with db.connect() as conn:
        with conn.begin() as transaction:
            queue.announce_work(conn)
            transaction.rollback()
    assert not signal.wait(0.5)
    with db.begin() as conn:
        assert queue.release(conn, worker, [r.id for r in claimed]) == 2
    assert signal.wait(30)
    signal.close()
    client.batches.cancel(batch.id)


def test_a_cancelled_batch_tells_workers_their_work_may_be_taken(client, db, own_model):
    signal = quiet_signal(db)
    assert signal.work_taken()  # whatever happened before listening started is unknown
    assert not signal.work_taken()
    batch = submit(client, [request_line("c", own_model)])
    assert not signal.work_taken()  # queued work takes nothing away
    client.batches.cancel(batch.id)
    wait_for(signal.work_taken, 30, interval=0.05, message="cancel notification")
    assert not signal.work_taken()
    signal.close()


def test_a_lost_listener_falls_back_to_waiting_out_the_timeout(db, caplog):
    signal = quiet_signal(db)
    backend = signal._pooled.driver_connection.info.backend_pid
    with db.begin() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": backend}).scalar()
    with caplog.at_level(logging.WARNING):
        started = time.monotonic()
        assert not signal.wait(0.5)
        assert not signal.wait(0.5)
    assert time.monotonic() - started >= 0.9  # it still waits: the worker's timer claims meanwhile
    assert "lost the wake-up connection" in caplog.text
    assert signal.work_taken() and signal.work_taken()  # unheard: the worker must ask the database
    signal.close()
