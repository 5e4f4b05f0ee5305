"""Which deaths charge the requests a worker held a crash, on the real database: silence judged
against its host's beat, the watchdog's own verdicts, and requests that keep losing their host."""

from __future__ import annotations

import logging
import uuid

import sqlalchemy as sa

from core.batch_app.config import Settings
from core.batch_app.domain import housekeeping, registry
from core.batch_app.domain.statuses import DeathCause

from .conftest import database_of_the_module
from .jsonl import request_line, submit
from .simulated_worker import claim

# The silent workers these tests make are for the test to judge: another test's watchdog on the
# same database would judge them first, as its own host.
database, db, api = database_of_the_module("worker-deaths")

TIMEOUT = 60
OBSERVER = Settings(heartbeat_timeout=TIMEOUT, host_name="observer", max_attempts=1)  # any charge would be poison


def worker_on(db, host: str, model: str) -> str:
    worker_id = str(uuid.uuid4())
    with db.begin() as conn:
        registry.register_worker(conn, worker_id=worker_id, slot="s", host=host, pid=1, model=model, gpu_ids="")
    return worker_id


def silent_for(db, seconds: int, worker: str | None = None, host: str | None = None) -> None:
    """The worker's last heartbeat, or its host's last beat, `seconds` ago."""
    with db.begin() as conn:
        if worker:
            conn.execute(sa.text("UPDATE workers SET last_seen = now() - make_interval(secs => :s) WHERE id = :w"),
                         {"s": seconds, "w": worker})
        if host:
            registry.beat_host(conn, host)
            conn.execute(sa.text("UPDATE hosts SET last_seen = now() - make_interval(secs => :s) WHERE host = :h"),
                         {"s": seconds, "h": host})


def requests_of(db, batch_id: str) -> list[tuple]:
    with db.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(
            "SELECT custom_id, status, crashes, host_losses FROM batch_requests WHERE batch_id = :b ORDER BY line"),
            {"b": batch_id})]


def death_of(db, worker: str) -> tuple | None:
    with db.connect() as conn:
        row = conn.execute(sa.text("SELECT cause, declared_by, requests FROM worker_deaths WHERE worker_id = :w"),
                           {"w": worker}).first()
    return tuple(row) if row else None


def test_a_worker_silent_together_with_its_host_was_lost_with_it_and_charges_nothing(client, db, own_model):
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(2)])
    host = f"host-{uuid.uuid4().hex[:8]}"
    worker = worker_on(db, host, own_model)
    claim(db, worker, own_model, 2, max_attempts=1)
    silent_for(db, TIMEOUT + 5, worker=worker, host=host)
    housekeeping.run_once(db, OBSERVER)
    assert death_of(db, worker) == (DeathCause.HOST_SILENT, "observer", 2)
    assert requests_of(db, batch.id) == [("r0", "queued", 0, 1), ("r1", "queued", 0, 1)]
    client.batches.cancel(batch.id)


def test_a_silent_worker_on_a_live_host_is_its_watchdogs_to_judge(client, db, own_model):
    batch = submit(client, [request_line("r0", own_model)])
    host = f"host-{uuid.uuid4().hex[:8]}"
    hung = worker_on(db, host, own_model)
    claim(db, hung, own_model, 1, max_attempts=2)
    silent_for(db, TIMEOUT + 5, worker=hung, host=host)
    silent_for(db, 0, host=host)  # its host beats
    housekeeping.run_once(db, OBSERVER)
    assert death_of(db, hung) is None and requests_of(db, batch.id) == [("r0", "running", 0, 0)]
    with db.begin() as conn:  # its watchdog's verdict: a hang may be the request's doing
        registry.mark_worker_dead(conn, hung, DeathCause.HUNG, "hung: no heartbeat for 65 s", host)
    housekeeping.run_once(db, Settings(heartbeat_timeout=TIMEOUT, max_attempts=2))
    assert death_of(db, hung) == (DeathCause.HUNG, host, 1)
    assert requests_of(db, batch.id) == [("r0", "queued", 1, 0)]

    # A worker its watchdog never judges is declared dead by others in the end, charging nothing.
    unwatched = worker_on(db, host, own_model)
    claim(db, unwatched, own_model, 1, max_attempts=2)
    silent_for(db, registry.UNWATCHED_SILENCES * TIMEOUT + 5, worker=unwatched)
    silent_for(db, 0, host=host)
    housekeeping.run_once(db, Settings(heartbeat_timeout=TIMEOUT, max_attempts=2, host_name="observer"))
    assert death_of(db, unwatched) == (DeathCause.UNWATCHED, "observer", 1)
    assert requests_of(db, batch.id) == [("r0", "queued", 1, 0)]
    client.batches.cancel(batch.id)


def test_a_request_at_many_host_losses_in_a_row_is_logged_with_its_id_and_runs_on(client, db, own_model, caplog):
    batch = submit(client, [request_line("r0", own_model)])
    settings = Settings(heartbeat_timeout=TIMEOUT, host_name="observer", max_attempts=1, warn_after_host_losses=2)
    caplog.set_level(logging.WARNING, logger=housekeeping.__name__)
    for losses in (1, 2):
        host = f"host-{uuid.uuid4().hex[:8]}"
        worker = worker_on(db, host, own_model)
        [request] = claim(db, worker, own_model, 1, max_attempts=1)
        silent_for(db, TIMEOUT + 5, worker=worker, host=host)
        housekeeping.run_once(db, settings)
        assert requests_of(db, batch.id) == [("r0", "queued", 0, losses)]
    warnings = [record.getMessage() for record in caplog.records if "host losses in a row" in record.getMessage()]
    assert warnings == [(f"request {request.id} (custom_id r0 of batch {batch.id}) was in flight at 2 host losses "
                         f"in a row; it is not failed for that, but it may be what brings its hosts down")]
    killed = worker_on(db, "host-alive", own_model)  # any other death ends the row
    claim(db, killed, own_model, 1, max_attempts=1)
    with db.begin() as conn:
        registry.mark_worker_dead(conn, killed, DeathCause.KILLED)
    housekeeping.run_once(db, settings)
    assert requests_of(db, batch.id) == [("r0", "queued", 0, 0)]
    client.batches.cancel(batch.id)
