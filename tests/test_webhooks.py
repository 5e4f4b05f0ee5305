"""Webhooks, end to end with the official SDK: endpoints managed with `client.webhooks`, a local
receiver verifying every delivery with `client.webhooks.unwrap`, one event per ended batch for
each of the four endings, a receiver that refuses and fails for a while, a sender SIGKILLed with
a delivery pending, secret rotation, the test call, and private URLs refused."""

from __future__ import annotations

import json
import os
import signal
import time

import openai
import pytest
import sqlalchemy as sa

from core.batch_app.database import migrate, open_database
from core.batch_app.domain.keys import create_key

from .conftest import (
    batchctl,
    echo_slot,
    live_worker,
    scratch_database,
    start_api,
    start_watchdog,
    wait_for,
    wait_for_batch,
)
from .jsonl import request_line, submit
from .receivers import Receiver

SLOT = "hook-echo"
SENDER = {"WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_BACKOFF_MIN": "0.5", "WEBHOOK_BACKOFF_MAX": "1",
          "WEBHOOK_POLL_INTERVAL": "0.2", "HOUSEKEEPING_INTERVAL": "0.5", "ECHO_STEP_SECONDS": "0.2"}


@pytest.fixture(scope="module")
def hook_database(database):
    """A database of this module's own: the senders of other tests' watchdogs, which refuse
    loopback receivers, never see its deliveries."""
    with scratch_database(database) as url:
        migrate(url)
        yield url


@pytest.fixture(scope="module")
def db(hook_database):
    engine = open_database(hook_database, pool_size=2)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def stack(hook_database, data_dir, db):
    api = start_api(hook_database, data_dir, "api-webhooks", WEBHOOK_ALLOW_PRIVATE="true")
    watchdog = start_watchdog(hook_database, data_dir, "watchdog-webhooks", [echo_slot(SLOT)], **SENDER)
    wait_for(lambda: live_worker(db, SLOT), 60, message="worker up")
    yield api, watchdog
    if watchdog.process.poll() is None:
        watchdog.stop()
    api.stop()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.down()


def lines(count: int) -> list[dict]:
    return [request_line(f"r{i}", SLOT) for i in range(count)]


def test_endpoints_are_managed_with_the_sdk_and_scoped_to_a_project(stack, receiver, db, client):
    api, _ = stack
    hooks = api.client()
    created = hooks.webhooks.create(url=receiver.url, event_types=["batch.completed"], name="ci")
    assert created.id.startswith("we_") and created.signing_secret.startswith("whsec_")
    assert created.signing_secret_hint.endswith(created.signing_secret[-4:])
    got = hooks.webhooks.retrieve(created.id)
    assert (got.url, got.event_types, got.name) == (receiver.url, ["batch.completed"], "ci")
    assert "signing_secret" not in got.model_dump() and created.signing_secret not in json.dumps(got.model_dump())
    assert created.id in [endpoint.id for endpoint in hooks.webhooks.list()]
    time.sleep(1.1)
    updated = hooks.webhooks.update(created.id, name="ci-2", event_types=["batch.completed", "batch.failed"])
    assert (updated.name, updated.event_types) == ("ci-2", ["batch.completed", "batch.failed"])
    assert updated.updated_at > created.updated_at
    assert hooks.webhooks.update(created.id, name="ci-2").updated_at == updated.updated_at  # unchanged
    rotated = hooks.webhooks.rotate_secret(created.id)
    assert rotated.signing_secret != created.signing_secret
    with db.begin() as conn:  # another project sees none of it
        other = api.client(create_key(conn, "other-project"))
    assert created.id not in [endpoint.id for endpoint in other.webhooks.list()]
    with pytest.raises(openai.NotFoundError):
        other.webhooks.retrieve(created.id)
    deleted = hooks.webhooks.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "webhook_endpoint.deleted")
    with pytest.raises(openai.NotFoundError):
        hooks.webhooks.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as unknown:
        hooks.webhooks.create(url=receiver.url, event_types=["video.completed"], name="x")
    assert unknown.value.body["param"] == "event_types"
    # The shared API does not allow private addresses: the server cannot be made to probe its network.
    for url in (receiver.url, "http://169.254.169.254/latest", "https://10.0.0.1/hook", "https://localhost/hook"):
        with pytest.raises(openai.BadRequestError) as private:
            client.webhooks.create(url=url, event_types=["batch.completed"], name="x")
        assert private.value.body["param"] == "url", url


def test_each_ending_sends_one_signed_event(stack, receiver, db):
    api, watchdog = stack
    hooks = api.client()
    endpoint = hooks.webhooks.create(url=receiver.url, name="all",
                                     event_types=["batch.completed", "batch.failed", "batch.expired",
                                                  "batch.cancelled"])
    try:
        completed = wait_for_batch(hooks, submit(hooks, lines(5)).id, 60)
        failed = submit(hooks, [{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": "no"}])
        expired = submit(hooks, lines(400), completion_window="2s")
        cancelled = submit(hooks, lines(400))
        wait_for(lambda: hooks.batches.retrieve(cancelled.id).request_counts.completed > 0, 30, message="running")
        hooks.batches.cancel(cancelled.id)
        endings = {completed.id: "batch.completed", failed.id: "batch.failed", expired.id: "batch.expired",
                   cancelled.id: "batch.cancelled"}
        for batch_id in endings:
            wait_for_batch(hooks, batch_id, 60)
        wait_for(lambda: all(receiver.for_batch(b) for b in endings), 30, message="an event per ending")
        time.sleep(1)
        events = receiver.events(hooks, endpoint.signing_secret)
        assert sorted((event.data.id, event.type) for event in events) == sorted(endings.items())  # once each
        assert all(event.object == "event" and event.id.startswith("evt_") for event in events)
        for body, headers in receiver.deliveries:
            assert headers["webhook-id"] == json.loads(body)["id"]
        with pytest.raises(openai.InvalidWebhookSignatureError):
            hooks.webhooks.unwrap(*receiver.deliveries[0], secret="whsec_" + "A" * 44)
        listed = batchctl(watchdog.env, "webhooks")
        assert listed.returncode == 0 and "delivered" in listed.stdout and "batch.expired" in listed.stdout
    finally:
        hooks.webhooks.delete(endpoint.id)


def test_a_receiver_down_then_failing_gets_the_event_with_the_same_id(stack, receiver, db):
    api, watchdog = stack
    hooks = api.client()
    endpoint = hooks.webhooks.create(url=receiver.url, name="flaky", event_types=["batch.completed"])
    try:
        receiver.down()
        batch = wait_for_batch(hooks, submit(hooks, lines(3)).id, 60)
        with db.connect() as conn:
            tries = lambda: conn.execute(sa.text(
                "SELECT attempts, last_error FROM webhook_deliveries WHERE endpoint_id = :e"), {"e": endpoint.id}).one()
            wait_for(lambda: tries().attempts >= 2, 30, message="tries refused")
            assert "ConnectError" in tries().last_error
        diagnosis = batchctl(watchdog.env, "diagnose")
        assert f"webhook deliveries to {receiver.url} are failing" in diagnosis.stdout
        receiver.status = 500
        receiver.up()
        wait_for(lambda: len(receiver.deliveries) >= 2, 30, message="tries answered 500")
        receiver.status = 200
        wait_for(lambda: receiver.deliveries and receiver.deliveries[-1] and _delivered(db, endpoint.id), 30,
                 message="delivered")
        ids = {headers["webhook-id"] for _, headers in receiver.deliveries}
        assert len(ids) == 1  # every try the same event
        [event] = {(e.id, e.data.id) for e in receiver.events(hooks, endpoint.signing_secret)}
        assert event[1] == batch.id
    finally:
        hooks.webhooks.delete(endpoint.id)


def _delivered(db, endpoint_id: str) -> bool:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT status FROM webhook_deliveries WHERE endpoint_id = :e"),
                            {"e": endpoint_id}).scalar() == "delivered"


def test_a_rotated_secret_signs_the_next_delivery_and_test_sends_one(stack, receiver, db):
    api, _ = stack
    hooks = api.client()
    endpoint = hooks.webhooks.create(url=receiver.url, name="rotating", event_types=["batch.completed"])
    try:
        rotated = hooks.webhooks.rotate_secret(endpoint.id)
        wait_for_batch(hooks, submit(hooks, lines(2)).id, 60)
        wait_for(lambda: receiver.deliveries, 30, message="delivered")
        [event] = receiver.events(hooks, rotated.signing_secret)
        assert event.type == "batch.completed"
        with pytest.raises(openai.InvalidWebhookSignatureError):
            receiver.events(hooks, endpoint.signing_secret)

        tested = hooks.webhooks.test(endpoint.id, event_type="batch.failed")
        assert (tested.status_code, tested.success, tested.webhook_endpoint_id) == (200, True, endpoint.id)
        assert receiver.events(hooks, rotated.signing_secret)[-1].type == "batch.failed"
    finally:
        hooks.webhooks.delete(endpoint.id)


def test_a_delivery_pending_when_the_sender_is_killed_is_delivered_after_restart(hook_database, data_dir, stack,
                                                                                 receiver, db):
    api, watchdog = stack
    hooks = api.client()
    endpoint = hooks.webhooks.create(url=receiver.url, name="survives", event_types=["batch.completed"])
    receiver.down()
    batch = wait_for_batch(hooks, submit(hooks, lines(3)).id, 60)
    with db.connect() as conn:
        wait_for(lambda: conn.execute(sa.text("SELECT attempts FROM webhook_deliveries WHERE endpoint_id = :e"),
                                      {"e": endpoint.id}).scalar() >= 1, 30, message="a try refused")
    worker = live_worker(db, SLOT)
    os.kill(watchdog.process.pid, signal.SIGKILL)
    watchdog.process.wait(10)
    os.kill(worker.pid, signal.SIGKILL)  # its worker too: a new watchdog would clean it up anyway
    receiver.up()
    time.sleep(2)
    assert not receiver.deliveries  # nobody sends while no watchdog runs
    again = start_watchdog(hook_database, data_dir, "watchdog-webhooks-2", [echo_slot(SLOT)], **SENDER)
    try:
        wait_for(lambda: receiver.deliveries, 60, message="delivered by the new watchdog")
        [event] = receiver.events(hooks, endpoint.signing_secret)
        assert event.data.id == batch.id
    finally:
        hooks.webhooks.delete(endpoint.id)
        assert again.stop() == 0
