"""Signing secrets are sealed in the database with WEBHOOK_SECRET_KEY, never logged, and the
secrets of a database from before (plain text, migration 0014 from 0013 with rows) keep signing
until a sender seals them."""

from __future__ import annotations

import openai
import pytest
import sqlalchemy as sa
from alembic import command

from core.batch_app.config import Settings
from core.batch_app.database import alembic_config, migrate, open_database
from core.batch_app.domain import webhooks
from core.batch_app.domain.webhook_secrets import (
    SEALED,
    SecretBox,
    UnreadableSecret,
    seal_stored,
)

from .conftest import (
    scratch_database,
    start_api,
    start_watchdog,
    wait_for,
    wait_for_batch,
)
from .jsonl import submit
from .receivers import Receiver

KEY = "a long random operator key, kept out of the database"
PLAIN = "whsec_" + "QUFB" * 11  # a secret written before any key was set
STACK = {"WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_SECRET_KEY": KEY, "REQUIRE_LIVE_WORKER": "false",
         "WEBHOOK_POLL_INTERVAL": "0.2", "WEBHOOK_BACKOFF_MIN": "0.5", "WEBHOOK_BACKOFF_MAX": "1"}


def test_a_box_seals_with_its_first_key_and_opens_with_any():
    old, new = SecretBox(["old key"]), SecretBox(["new key", "old key"])
    sealed = old.seal(PLAIN)
    assert sealed.startswith(SEALED) and PLAIN not in sealed and old.seal(PLAIN) != sealed  # a fresh nonce
    assert old.open(sealed) == new.open(sealed) == PLAIN and old.open(PLAIN) == PLAIN
    assert new.needs_sealing(sealed) and new.needs_sealing(PLAIN) and not new.needs_sealing(new.seal(PLAIN))
    assert not SecretBox([]).needs_sealing(PLAIN)
    for box in (SecretBox([]), SecretBox(["another key"])):
        with pytest.raises(UnreadableSecret):
            box.open(sealed)


@pytest.fixture
def db_url(database):
    with scratch_database(database) as url:
        migrate(url)
        yield url


def test_secrets_are_sealed_sign_deliveries_and_never_reach_a_log(db_url, data_dir):
    receiver = Receiver()
    engine = open_database(db_url, pool_size=1)
    with engine.begin() as conn:  # an endpoint of before, its secret in plain text
        old = webhooks.create_endpoint(conn, Settings(), "default", name="old", url=receiver.url + "?old",
                                       event_types=["batch.failed"])
        conn.execute(sa.text("UPDATE webhook_endpoints SET secret = :s WHERE id = :id"), {"s": PLAIN, "id": old.id})
    api = start_api(db_url, data_dir, "api-secrets", **STACK)
    watchdog = start_watchdog(db_url, data_dir, "watchdog-secrets", [], **STACK)
    try:
        client = api.client()
        created = client.webhooks.create(url=receiver.url, event_types=["batch.failed"], name="new")
        assert created.signing_secret.startswith("whsec_")
        assert client.webhooks.retrieve(created.id).signing_secret_hint.endswith(created.signing_secret[-4:])
        wait_for_batch(client, submit(client, [{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
                                                "body": "no"}]).id, 30)
        wait_for(lambda: len(receiver.deliveries) == 2, 30, message="both delivered")
        verified = {}
        for body, headers in receiver.deliveries:  # each verifies with its own endpoint's secret
            for name, secret in (("new", created.signing_secret), ("old", PLAIN)):
                try:
                    verified[name] = client.webhooks.unwrap(body, headers, secret=secret)
                except openai.InvalidWebhookSignatureError:
                    pass
        assert set(verified) == {"new", "old"}
        with engine.connect() as conn:
            stored = dict(conn.execute(sa.text("SELECT id, secret FROM webhook_endpoints")).all())
        # Both sealed: the new one when created, the old one by the sender's first round.
        assert all(value.startswith(SEALED) for value in stored.values()), stored
        assert created.signing_secret not in str(stored) and PLAIN not in str(stored)
        # An API whose key cannot open the secret says so: the operator's doing, not a 500.
        keyless = start_api(db_url, data_dir, "api-secrets-other-key", **{**STACK, "WEBHOOK_SECRET_KEY": "another"})
        try:
            with pytest.raises(openai.InternalServerError) as unreadable:
                keyless.client().webhooks.test(created.id, event_type="batch.failed")
        finally:
            keyless.stop()
        assert unreadable.value.status_code == 503 and unreadable.value.body["code"] == "webhook_secret_unreadable"
    finally:
        watchdog.stop()
        api.stop()
        engine.dispose()
        receiver.down()
    logs = "".join(path.read_text(errors="replace") for name in ("api-secrets", "watchdog-secrets")
                   for path in (data_dir / "logs" / name).glob("*.log"))
    assert "sealed 1 webhook endpoints' signing secrets" in logs
    for secret in (created.signing_secret, PLAIN, KEY):
        assert secret not in logs


def test_a_key_put_first_reseals_every_secret_and_an_unknown_one_is_left_alone(db_url):
    engine = open_database(db_url, pool_size=1)
    first, second = Settings(webhook_secret_key="first"), Settings(webhook_secret_key="second,first")
    with engine.begin() as conn:
        one = webhooks.create_endpoint(conn, first, "p", name="a", url="https://example.com/", event_types=["batch.failed"])
        other = webhooks.create_endpoint(conn, Settings(webhook_secret_key="lost"), "p", name="b",
                                         url="https://example.com/", event_types=["batch.failed"])
        box = SecretBox(["second", "first"])
        assert seal_stored(conn, box) == 1 and seal_stored(conn, box) == 0
        rows = dict(conn.execute(sa.text("SELECT id, secret FROM webhook_endpoints")).all())
    assert SecretBox(["second"]).open(rows[one.id]) == SecretBox(["first"]).open(one.secret)
    assert rows[other.id] == other.secret  # nobody can open it: left as it was
    assert webhooks.endpoint_object(other, box)["signing_secret_hint"] == "whsec_...????"
    assert second.webhook_secret_key.get_secret_value() not in repr(second)
    engine.dispose()


def test_migration_0014_keeps_the_deliveries_and_secrets_of_before(database):
    with scratch_database(database) as url:
        command.upgrade(alembic_config(url), "0013")
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.execute(sa.text("""
                INSERT INTO webhook_endpoints (id, project, name, url, event_types, secret)
                VALUES ('we_1', 'p', 'n', 'https://example.com/', ARRAY['batch.failed'], :secret)"""),
                {"secret": PLAIN})
            conn.execute(sa.text("INSERT INTO webhook_events (id, project, type, payload) "
                                 "VALUES ('evt_1', 'p', 'batch.failed', '{}')"))
            conn.execute(sa.text("""
                INSERT INTO webhook_deliveries (event_id, endpoint_id, attempts, next_attempt_at)
                VALUES ('evt_1', 'we_1', 0, now()), ('evt_1', 'we_1', 1, now() + interval '1 minute')"""))
        command.upgrade(alembic_config(url), "0014")
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT failures, paused_until FROM webhook_endpoints")).one() == (0, None)
            [due] = webhooks.claim_deliveries(conn, Settings(), 10, 30)  # the one of a sender of before waits
            assert (due.attempts, due.secret, due.event_id) == (1, PLAIN, "evt_1")
        command.downgrade(alembic_config(url), "0013")
        engine.dispose()
