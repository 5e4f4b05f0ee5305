"""Webhook receivers are hostile until proven otherwise: real receivers that send a gzip bomb,
answer a byte every two seconds, or never answer, against a real API and a real watchdog's
sender. Another project's delivery still arrives in seconds, `/test` answers within
WEBHOOK_TIMEOUT and holds none of the API's threads, both processes' memory stays bounded, and
what a receiver or a tenant writes is refused or shown as it is, never obeyed."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
import sqlalchemy as sa

from core.batch_app.domain.keys import create_key

from .conftest import (
    batchctl,
    database_of_the_module,
    start_api,
    start_watchdog,
    wait_for,
    wait_for_batch,
)
from .jsonl import submit
from .receivers import FORGED, HostileReceivers, Receiver

TIMEOUT = 2.0  # WEBHOOK_TIMEOUT of this module's stack
HELD = 10.0  # WEBHOOK_TIMEOUT of the API under sixty held tests
LIMITS = {"WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_TIMEOUT": str(TIMEOUT), "WEBHOOK_MAX_ENDPOINTS_PER_PROJECT": "30",
          "REQUIRE_LIVE_WORKER": "false"}
SENDER = {**LIMITS, "WEBHOOK_POLL_INTERVAL": "0.2", "WEBHOOK_BACKOFF_MIN": "1", "WEBHOOK_BACKOFF_MAX": "2",
          "WEBHOOK_CONCURRENCY": "8", "WEBHOOK_CONCURRENCY_PER_ENDPOINT": "2", "WEBHOOK_BREAKER_FAILURES": "2"}
FAILING_LINE = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": "not an object"}
MEMORY_BOUND = 64 << 20  # what a process may grow by while hostile receivers answer it


database, db, api = database_of_the_module("hostile", **LIMITS)


@pytest.fixture(scope="module")
def stack(database, data_dir, api):
    """An API, and a watchdog with no workers: its sender is what is under test."""
    watchdog = start_watchdog(database, data_dir, "watchdog-hostile", [], **SENDER)
    yield api, watchdog
    watchdog.stop()


@pytest.fixture(scope="module")
def hostile():
    receivers = HostileReceivers()
    yield receivers
    receivers.close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.down()


def project(api, db, name: str) -> openai.OpenAI:
    with db.begin() as conn:
        return api.client(create_key(conn, name))


def failed_batch(client: openai.OpenAI) -> str:
    """A batch that fails at once (its only line is refused): its ending is an event."""
    return wait_for_batch(client, submit(client, [FAILING_LINE]).id, 30).id


class PeakMemory:
    """The largest resident set size of a process, sampled every 50 ms while the block runs."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.start = self.peak = self.process.memory_info().rss
        self._done = threading.Event()

    def __enter__(self):
        def sample():
            while not self._done.wait(0.05):
                self.peak = max(self.peak, self.process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def test_a_project_with_dozens_of_hostile_receivers_holds_up_no_other_project(stack, hostile, receiver, db):
    api, watchdog = stack
    attacker, victim = project(api, db, "attacker"), project(api, db, "bystander")
    for n in range(24):
        kind = HostileReceivers.KINDS[n % len(HostileReceivers.KINDS)]
        attacker.webhooks.create(url=hostile.url(kind, str(n)), event_types=["batch.failed"], name=f"{kind}-{n}")
    endpoint = victim.webhooks.create(url=receiver.url, event_types=["batch.failed"], name="healthy")
    # A first delivery loads what any sending needs (the HTTP client, the TLS authorities).
    warm_up = failed_batch(victim)
    wait_for(lambda: receiver.for_batch(warm_up), 30, interval=0.1, message="a first delivery")
    with PeakMemory(watchdog.process.pid) as memory:
        for _ in range(3):  # 72 deliveries to hostile receivers, most of them taking the whole deadline
            failed_batch(attacker)
        wait_for(lambda: sum(hostile.requests.values()) >= 8, 30, message="the hostile receivers busy")
        batch_id = failed_batch(victim)
        ended = time.monotonic()
        wait_for(lambda: receiver.for_batch(batch_id), 30, interval=0.1, message="the bystander's delivery")
        arrived = time.monotonic() - ended
        with db.connect() as conn:
            wait_for(lambda: conn.execute(sa.text(
                "SELECT bool_and(d.attempts > 0) FROM webhook_deliveries d JOIN webhook_endpoints ep "
                "ON ep.id = d.endpoint_id WHERE ep.project = 'attacker'")).scalar(), 60, message="every one tried")
    assert [event.data.id for event in receiver.events(victim, endpoint.signing_secret)] == [warm_up, batch_id]
    assert arrived < 30, f"the bystander waited {arrived:.1f} s behind the hostile receivers"
    assert memory.growth < MEMORY_BOUND, f"the watchdog grew by {memory.growth >> 20} MiB"
    assert all(hostile.requests.get(kind) for kind in HostileReceivers.KINDS)
    with db.connect() as conn:
        tries = {row.kind: row for row in conn.execute(sa.text("""
            SELECT split_part(split_part(ep.url, '/', 4), '?', 1) AS kind, array_agg(DISTINCT d.status) AS statuses,
                   array_agg(DISTINCT left(d.last_error, 30)) FILTER (WHERE d.last_error <> '') AS errors,
                   max(ep.failures) AS failures
            FROM webhook_deliveries d JOIN webhook_endpoints ep ON ep.id = d.endpoint_id
            WHERE ep.project = 'attacker' GROUP BY 1"""))}
    assert tries["bomb-ok"].statuses == ["delivered"]  # a 200 is a 200; its body is never read
    assert any(e.startswith("HTTP 500: \\x1f") for e in tries["bomb-error"].errors)  # a few bytes, as they came
    for kind in ("dribble", "silent"):  # each try ended at its deadline and was recorded as failed
        assert any(e.startswith(f"no answer within {TIMEOUT:g} s") for e in tries[kind].errors), tries[kind].errors
        assert tries[kind].failures >= 2  # their breakers opened
    listed = batchctl(watchdog.env, "webhooks")
    assert listed.returncode == 0, listed.stderr


def test_test_answers_within_the_deadline_and_blocks_no_other_request(database, data_dir, hostile, db):
    """Sixty tests held by dribbling or silent receivers (more than the API's 40 threads): reads
    sent while every one of them is held are answered before any of them ends, and each ends at
    its deadline. An API of its own whose deadline outlasts any stall of this machine, so that
    the order of events, not the machine's speed, decides."""
    api = start_api(database, data_dir, "api-hostile-held", **(LIMITS | {"WEBHOOK_TIMEOUT": str(HELD)}))
    try:
        tester = project(api, db, "tester")
        endpoints = {kind: tester.webhooks.create(url=hostile.url(kind, "held"), event_types=["batch.failed"], name=kind).id
                     for kind in ("dribble", "silent", "bomb-ok", "bomb-error", "unavailable")}
        http = httpx.Client(base_url=api.base_url, headers={"Authorization": f"Bearer {tester.api_key}"}, timeout=60)

        def test(kind: str) -> tuple[httpx.Response, float]:
            started = time.monotonic()
            answer = http.post(f"/v1/webhook_endpoints/{endpoints[kind]}/test", json={"event_type": "batch.failed"})
            return answer, time.monotonic() - started

        def held() -> int:
            return hostile.paths[hostile.path("dribble", "held")] + hostile.paths[hostile.path("silent", "held")]

        with PeakMemory(api.process.pid) as memory, ThreadPoolExecutor(72) as pool:
            slow = [pool.submit(test, kind) for kind in ("dribble", "silent") * 30]
            # With a thread of the API's 40 each, no more than 40 would reach their receivers.
            wait_for(lambda: held() >= len(slow), HELD / 2, interval=0.05, message="all 60 tests at their receivers")
            listed = http.get("/v1/webhook_endpoints")  # a route on the API's thread pool
            files = http.get("/v1/files")
            ended_first = [future for future in slow if future.done()]
            bombs = [pool.submit(test, kind) for kind in ("bomb-ok", "bomb-error", "bomb-error") * 4]
            answers = [future.result() for future in slow + bombs]
        assert listed.status_code == files.status_code == 200
        assert not ended_first, f"{len(ended_first)} held tests ended before two reads were answered"
        for answer, took in answers[:len(slow)]:
            assert answer.status_code == 400 and took < HELD + 3, (answer.text, took)
            error = answer.json()["error"]
            assert (error["param"], error["code"]) == ("url", "webhook_unreachable")
            assert error["message"] == f"The test event could not be delivered: no HTTP answer within {HELD:g} s."
        assert {answer.status_code for answer, _ in answers[len(slow):]} == {200, 400}
        assert all(a.json()["success"] is True for a, _ in answers[len(slow):] if a.status_code == 200)
        assert memory.growth < MEMORY_BOUND, f"the API grew by {memory.growth >> 20} MiB"
        unavailable, _ = test("unavailable")  # a 5xx is never a success
        assert (unavailable.status_code, unavailable.json()["error"]["code"]) == (400, "webhook_test_failed")
    finally:
        api.stop()


def test_a_failed_connection_reads_the_same_as_silence(stack, db):
    """Refused, reset or silent: /test says the same, so it cannot map which ports answer."""
    api, _ = stack
    tester = project(api, db, "scanner")
    closed = Receiver()
    closed.down()
    endpoint = tester.webhooks.create(url=closed.url, event_types=["batch.failed"], name="closed")
    with pytest.raises(openai.BadRequestError) as refused:
        tester.webhooks.test(endpoint.id, event_type="batch.failed")
    assert refused.value.body["message"] == (f"The test event could not be delivered: no HTTP answer within "
                                             f"{TIMEOUT:g} s.")


@pytest.mark.parametrize(("field", "value"), [
    ("url", "https://[::1/"), ("url", "https://1.1.1.1/\u0001"), ("url", "https://1.1.1.1/a\x00b"),
    ("url", "https://1.1.1.1/" + "a" * 70_000), ("url", "https://1.1.1.1/" + "a" * 2_100), ("url", "https://example.com:99999/"), ("url", "ftp://example.com/"),
    ("url", "https://user:password@example.com/"), ("url", "https://1.1.1.1/a b"),
    ("name", "a\x00b"), ("name", "line\nbreak"), ("name", "n" * 257),
])
def test_a_bad_url_or_name_is_a_400_naming_it_at_create_and_update(stack, db, receiver, field, value):
    api, _ = stack
    client = project(api, db, "validation")
    fields = {"url": receiver.url, "name": "ok"} | {field: value}
    with pytest.raises(openai.BadRequestError) as created:
        client.webhooks.create(event_types=["batch.failed"], **fields)
    assert created.value.body["param"] == field
    endpoint = client.webhooks.create(url=receiver.url, event_types=["batch.failed"], name="ok")
    try:
        with pytest.raises(openai.BadRequestError) as updated:
            client.webhooks.update(endpoint.id, **{field: value})
        assert updated.value.body["param"] == field
        assert client.webhooks.retrieve(endpoint.id).url == receiver.url
    finally:
        client.webhooks.delete(endpoint.id)


def test_a_project_has_at_most_its_endpoints_and_another_is_unaffected(stack, db, receiver):
    api, _ = stack
    full, other = project(api, db, "full"), project(api, db, "not-full")
    with ThreadPoolExecutor(8) as pool:  # at once: two creates never both take the last place
        created = list(pool.map(lambda n: _create(full, receiver.url, n), range(34)))
    made = [one for one in created if isinstance(one, str)]
    refusals = [one for one in created if not isinstance(one, str)]
    assert len(made) == 30 and len(refusals) == 4
    assert all((r.status_code, r.body["code"]) == (429, "webhook_max_endpoints_per_project") for r in refusals)
    assert "WEBHOOK_MAX_ENDPOINTS_PER_PROJECT = 30" in refusals[0].body["message"]
    assert len(full.webhooks.list(limit=100).data) == 30
    assert isinstance(_create(other, receiver.url, 0), str)
    full.webhooks.delete(made[0])
    assert isinstance(_create(full, receiver.url, 99), str)  # room again


def _create(client: openai.OpenAI, url: str, n: int):
    try:
        return client.webhooks.create(url=f"{url}?n={n}", event_types=["batch.failed"], name=f"e{n}").id
    except openai.RateLimitError as refused:
        return refused


def test_batchctl_shows_what_receivers_write_as_it_is(stack, hostile, db):
    api, watchdog = stack
    client = project(api, db, "forger")
    endpoint = client.webhooks.create(url=hostile.url("forge", "1") + "&[bold]x[/bold]=1", event_types=["batch.failed"],
                                      name="forge")
    failed_batch(client)
    with db.connect() as conn:
        wait_for(lambda: conn.execute(sa.text("SELECT last_error FROM webhook_deliveries WHERE endpoint_id = :e"),
                                      {"e": endpoint.id}).scalar(), 30, message="the forged answer recorded")
    listed = batchctl(watchdog.env, "webhooks")
    assert listed.returncode == 0, listed.stderr
    shown = FORGED.replace("\x1b", "\\x1b")  # as written, its terminal escape escaped
    assert shown in listed.stdout and "\x1b" not in listed.stdout
    assert "&[bold]x[/bold]=1" in listed.stdout
