"""The delivery protocol in the database (domain/webhooks.py): a claim shares the senders between
projects and endpoints, bounds the tries in flight per endpoint, skips a paused endpoint; only
the holder of a delivery's lease records its try; and deliveries per event are capped."""

from __future__ import annotations

import re
import time

import pytest
import sqlalchemy as sa

from core.batch_app.config import Settings
from core.batch_app.database import migrate, open_database
from core.batch_app.domain import webhooks
from core.batch_app.domain.statuses import BatchStatus

from .conftest import scratch_database

SETTINGS = Settings(webhook_concurrency_per_endpoint=2, webhook_breaker_failures=2, webhook_backoff_min=60,
                    webhook_backoff_max=120, webhook_max_endpoints_per_project=100)


@pytest.fixture
def db(database):
    with scratch_database(database) as url:
        migrate(url)
        engine = open_database(url, pool_size=2)
        yield engine
        engine.dispose()


def endpoints(db, project: str, count: int) -> list[str]:
    with db.begin() as conn:
        return [webhooks.create_endpoint(conn, SETTINGS, project, name=f"e{n}", url=f"https://example.com/{n}",
                                         event_types=["batch.failed"]).id for n in range(count)]


def batch_fails(db, project: str, times: int = 1) -> None:
    with db.begin() as conn:
        for n in range(times):
            webhooks.record_batch_event(conn, project, f"batch_{project}_{n}", BatchStatus.FAILED)


def claim(db, limit: int, lease: float = 30) -> list:
    with db.begin() as conn:
        return webhooks.claim_deliveries(conn, SETTINGS, limit, lease)


def test_a_free_sender_goes_to_the_project_with_the_fewest_tries_in_flight(db):
    endpoints(db, "a-crowd", 20)
    batch_fails(db, "a-crowd", 3)  # 60 deliveries, all due before the other project's one
    [other] = endpoints(db, "b-bystander", 1)
    batch_fails(db, "b-bystander")
    first = claim(db, 8)
    assert {d.project for d in first} == {"a-crowd", "b-bystander"}  # both projects in the first claim
    assert len({d.endpoint_id for d in first if d.project == "a-crowd"}) == 7  # round-robin between endpoints
    batch_fails(db, "b-bystander")
    [next_one] = claim(db, 1)  # one sender free: the project with fewer tries in flight
    assert next_one.endpoint_id == other


def test_an_endpoint_has_at_most_its_share_in_flight_and_none_while_paused(db):
    [endpoint] = endpoints(db, "p", 1)
    batch_fails(db, "p", 5)
    taken = claim(db, 10)
    assert len(taken) == 2 and claim(db, 10) == []  # WEBHOOK_CONCURRENCY_PER_ENDPOINT
    for delivery in taken:  # two failures in a row: the breaker opens
        with db.begin() as conn:
            held, paused_until = webhooks.record_failed(conn, SETTINGS, delivery, 500, "HTTP 500", backoff=0)
        assert held
    assert paused_until is not None
    assert claim(db, 10) == []  # paused, although three deliveries are due
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE webhook_endpoints SET paused_until = now() WHERE id = :id"), {"id": endpoint})
    [probe] = claim(db, 10)  # the pause is over: one try, on probation
    assert claim(db, 10) == []
    with db.begin() as conn:
        assert webhooks.record_delivered(conn, probe, 200)
    assert len(claim(db, 10)) == 2  # closed again: its whole share


def test_only_the_holder_of_the_lease_records_a_try(db):
    endpoints(db, "p", 1)
    batch_fails(db, "p")
    [late] = claim(db, 1, lease=0.2)
    time.sleep(0.5)  # its sender is slow: the lease passes, another sender claims it and delivers
    [current] = claim(db, 1)
    assert current.id == late.id and current.attempts == late.attempts + 1
    with db.begin() as conn:  # the late sender's outcome, while the current try is in flight: nothing
        assert webhooks.record_failed(conn, SETTINGS, late, None, "timed out", backoff=1) == (False, None)
        assert not webhooks.record_delivered(conn, late, 200)
        row = conn.execute(sa.text("SELECT leased_until IS NOT NULL AS leased, last_error FROM webhook_deliveries")).one()
        assert (row.leased, row.last_error) == (True, "")
    with db.begin() as conn:
        assert webhooks.record_delivered(conn, current, 200)
        assert webhooks.record_failed(conn, SETTINGS, late, None, "timed out", backoff=1) == (False, None)
        assert not webhooks.record_delivered(conn, late, 200)
        row = conn.execute(sa.text("SELECT status, last_error, leased_until FROM webhook_deliveries")).one()
        failures = conn.execute(sa.text("SELECT failures FROM webhook_endpoints")).scalar()
    assert (row.status, row.last_error, row.leased_until, failures) == ("delivered", "", None, 0)


def test_an_event_has_at_most_a_hundred_deliveries(db):
    with db.begin() as conn:  # endpoints made before any limit
        conn.execute(sa.text("""
            INSERT INTO webhook_endpoints (id, project, name, url, event_types, secret)
            SELECT 'we_' || n, 'p', 'e', 'https://example.com/', ARRAY['batch.failed'], 'whsec_x'
            FROM generate_series(1, 105) n"""))
    batch_fails(db, "p")
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM webhook_deliveries")).scalar() == 100


def test_deleting_an_endpoint_finds_its_deliveries_by_index(db):
    [endpoint] = endpoints(db, "p", 1)
    with db.connect() as conn:
        conn.execute(sa.text("SET enable_seqscan = off"))
        plan = "\n".join(conn.execute(sa.text(
            "EXPLAIN DELETE FROM webhook_deliveries WHERE endpoint_id = :e"), {"e": endpoint}).scalars())
    assert re.search(r"on webhook_deliveries_endpoint\b(?!_)", plan), plan
