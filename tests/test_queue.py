"""The queue protocols on a real PostgreSQL: claim, complete with ownership, rescue, finalize once,
cancel and expire. Workers are simulated by calling the protocol functions as a worker does."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import threading
import time

import pytest
import sqlalchemy as sa

from core.batch_app import domain
from core.batch_app.config import Settings
from core.batch_app.database import migrate
from core.batch_app.domain import finalize, housekeeping, queue, registry
from core.batch_app.domain.queue import Completion
from core.batch_app.domain.statuses import DeathCause

from .conftest import scratch_database, wait_for_batch
from .jsonl import request_line, submit
from .simulated_worker import answer, claim, complete, new_worker


def statuses(db, batch_id: str) -> dict[str, int]:
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, count(*) FROM batch_requests WHERE batch_id = :b GROUP BY 1"),
                            {"b": batch_id}).all()
    return dict(rows)


def test_claim_marks_in_progress_and_follows_priority_then_age(client, db, own_model):
    low = submit(client, [request_line(f"low{i}", own_model) for i in range(3)])
    high = submit(client, [request_line(f"high{i}", own_model) for i in range(2)], extra_body={"priority": 5})
    worker = new_worker(db, own_model)
    claimed = claim(db, worker, own_model, 4)
    assert [r.custom_id for r in claimed] == ["high0", "high1", "low0", "low1"]
    assert all(r.attempt == 1 and r.endpoint == "/v1/chat/completions" for r in claimed)
    assert client.batches.retrieve(high.id).status == "in_progress"
    assert client.batches.retrieve(high.id).in_progress_at is not None
    client.batches.cancel(low.id), client.batches.cancel(high.id)


def test_concurrent_claims_never_share_a_request(client, db, own_model):
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(300)])
    workers = [new_worker(db, own_model) for _ in range(4)]
    taken: list[list[int]] = [[] for _ in workers]

    def drain(index: int) -> None:
        while claimed := claim(db, workers[index], own_model, 7):
            taken[index].extend(r.id for r in claimed)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [request_id for ids in taken for request_id in ids]
    assert len(everything) == len(set(everything)) == 300
    client.batches.cancel(batch.id)


def test_completion_needs_ownership_and_finalizes_once(client, db, own_model):
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(3)])
    worker = new_worker(db, own_model)
    requests = claim(db, worker, own_model, 10)
    stale = Completion(**{**answer(requests[0]).__dict__, "attempt": requests[0].attempt + 1})
    assert complete(db, worker, [stale]) == {}  # wrong attempt
    assert complete(db, new_worker(db, own_model), [answer(requests[0])]) == {}  # wrong worker
    assert set(complete(db, worker, [answer(r) for r in requests])) == {r.id for r in requests}
    assert complete(db, worker, [answer(requests[0], "again")]) == {}  # already finished

    winners: list[list[str]] = []
    threads = [threading.Thread(target=lambda: winners.append(finalize.finalize_ready(db, [batch.id])))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(map(len, winners)) == [0, 0, 0, 1]

    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.completed_at and done.finalizing_at
    assert done.request_counts.completed == 3 and done.request_counts.failed == 0
    assert done.usage.input_tokens == 9 and done.usage.output_tokens == 6 and done.usage.total_tokens == 15
    assert done.error_file_id is None
    lines = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in lines] == ["r0", "r1", "r2"]
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in lines)
    assert all(line["response"]["request_id"].startswith("req_") for line in lines)
    assert lines[0]["response"]["body"] == {"object": "chat.completion", "text": "ok"}
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_results_keep_every_character_through_storage(client, db, own_model):
    # NUL, which jsonb refuses; quotes and backslashes, which the stored JSON escapes twice;
    # U+2028, which splits lines for some JSONL readers; and non-ASCII text.
    texts = ["a\u0000b", 'say "hi" \\ back\\slash \\"', "line\u2028sep", "café 🙂 日本"]
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(len(texts))])
    worker = new_worker(db, own_model)
    requests = claim(db, worker, own_model, len(texts))
    assert len(complete(db, worker, [answer(r, texts[int(r.custom_id[1:])]) for r in requests])) == len(texts)
    finalize.finalize_ready(db, [batch.id])
    done = client.batches.retrieve(batch.id)
    output = client.files.content(done.output_file_id).text
    assert len(output.splitlines()) == len(texts)
    stored = {line["custom_id"]: line["response"]["body"]["text"] for line in map(json.loads, output.splitlines())}
    assert stored == {f"r{i}": text for i, text in enumerate(texts)}


def test_rescue_requeues_then_fails_a_poison_request(client, db, own_model):
    batch = submit(client, [request_line("poison", own_model), request_line("fine", own_model)])
    settings = Settings(max_attempts=2, heartbeat_timeout=60)
    for attempt in (1, 2):
        worker = new_worker(db, own_model)
        claimed = claim(db, worker, own_model, 1, max_attempts=2)
        assert [(r.custom_id, r.attempt) for r in claimed] == [("poison", attempt)]
        with db.begin() as conn:
            registry.mark_worker_dead(conn, worker, DeathCause.EXITED)
        housekeeping.run_once(db, settings)
        assert complete(db, worker, [answer(claimed[0])]) == {}  # the dead worker's late result is refused
    assert statuses(db, batch.id) == {"failed": 1, "queued": 1}

    survivor = new_worker(db, own_model)
    [fine] = claim(db, survivor, own_model, 5, max_attempts=2)
    complete(db, survivor, [answer(fine)])
    finalize.finalize_ready(db, [batch.id])
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    [error] = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert error["custom_id"] == "poison" and error["error"]["code"] == "poison_request"


def test_a_worker_declared_dead_claims_nothing_and_a_claim_under_way_is_rescued_once(client, db, own_model):
    submit(client, [request_line(f"r{i}", own_model) for i in range(4)])
    settings = Settings(max_attempts=3, heartbeat_timeout=60)
    fenced = new_worker(db, own_model)
    with db.begin() as conn:
        registry.mark_worker_dead(conn, fenced, DeathCause.HUNG)
    assert claim(db, fenced, own_model, 4) == []  # woken to be killed, it takes nothing back
    worker = new_worker(db, own_model)
    with db.begin() as claiming:  # a death declared while a claim is open is not held up by it
        taken = queue.claim(claiming, worker, own_model, 2, engine_idle=True, max_attempts=3)
        declaring = threading.Thread(target=lambda: declare_dead(db, worker))
        declaring.start()
        declaring.join(10)
        assert not declaring.is_alive()
    housekeeping.run_once(db, settings)  # what the claim took, committed after the death: charged once
    with db.connect() as conn:
        crashes = dict(conn.execute(sa.text("SELECT custom_id, crashes FROM batch_requests WHERE id = ANY(:ids)"),
                                    {"ids": [r.id for r in taken]}).all())
    assert crashes == {"r0": 1, "r1": 1}


def declare_dead(db, worker_id: str) -> None:
    with db.begin() as conn:
        registry.mark_worker_dead(conn, worker_id, DeathCause.HUNG)


def test_a_worker_killed_from_outside_charges_its_requests_no_crash(client, db, own_model):
    submit(client, [request_line("r0", own_model)])
    settings = Settings(max_attempts=2, heartbeat_timeout=60)
    for attempt in (1, 2, 3):  # more deaths than MAX_ATTEMPTS, none of them the request's doing
        worker = new_worker(db, own_model)
        [claimed] = claim(db, worker, own_model, 5, max_attempts=2)
        assert (claimed.attempt, claimed.crashes, claimed.is_last_attempt(2)) == (attempt, 0, False)
        with db.begin() as conn:
            registry.mark_worker_dead(conn, worker, DeathCause.KILLED)
        housekeeping.run_once(db, settings)
    crashed = new_worker(db, own_model)  # a crash counts: with MAX_ATTEMPTS 2 it is now a suspect
    claim(db, crashed, own_model, 5, max_attempts=2)
    with db.begin() as conn:
        registry.mark_worker_dead(conn, crashed, DeathCause.EXITED)
    housekeeping.run_once(db, settings)
    [suspect] = claim(db, new_worker(db, own_model), own_model, 5, max_attempts=2)
    assert (suspect.attempt, suspect.crashes, suspect.is_last_attempt(2)) == (5, 1, True)


def test_crash_survivors_on_their_last_attempt_run_alone_so_bystanders_are_not_charged(client, db, own_model):
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(3)])
    crashed = new_worker(db, own_model)
    assert len(claim(db, crashed, own_model, 10)) == 3
    with db.begin() as conn:
        registry.mark_worker_dead(conn, crashed, DeathCause.EXITED)
    housekeeping.run_once(db, Settings(max_attempts=2))
    fresh = submit(client, [request_line("new", own_model)])

    worker = new_worker(db, own_model)
    assert claim(db, worker, own_model, 10, idle=False, max_attempts=2) == []  # a busy engine drains first
    for expected in ("r0", "r1", "r2"):  # then each survivor runs alone, ahead of fresh work
        [suspect] = claim(db, worker, own_model, 10, max_attempts=2)
        assert (suspect.custom_id, suspect.attempt) == (expected, 2) and suspect.is_last_attempt(2)
        complete(db, worker, [answer(suspect)])
    assert [r.custom_id for r in claim(db, worker, own_model, 10, max_attempts=2)] == ["new"]
    assert client.batches.retrieve(batch.id).request_counts.completed == 3
    client.batches.cancel(fresh.id)


def test_silent_worker_is_declared_dead_and_fenced(client, db, own_model):
    batch = submit(client, [request_line("a", own_model)])
    worker = new_worker(db, own_model)
    claim(db, worker, own_model, 1)
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE workers SET last_seen = now() - interval '2 minutes' WHERE id = :w"),
                     {"w": worker})
    housekeeping.run_once(db, Settings(heartbeat_timeout=60))
    assert statuses(db, batch.id) == {"queued": 1}
    with db.begin() as conn:  # the silent worker's next beat tells it to stop
        assert not registry.heartbeat(conn, worker_id=worker, status="busy", in_flight=1,
                                   requests_done=0, tokens_done=0, progressed=False)
    client.batches.cancel(batch.id)


def test_release_hands_back_without_counting_an_attempt(client, db, own_model):
    batch = submit(client, [request_line("a", own_model)])
    worker = new_worker(db, own_model)
    [request] = claim(db, worker, own_model, 1)
    with db.begin() as conn:
        assert queue.release(conn, worker, [request.id]) == 1
    [again] = claim(db, new_worker(db, own_model), own_model, 1)
    assert again.id == request.id and again.attempt == 1
    client.batches.cancel(batch.id)


def test_cancel_takes_running_requests_from_their_worker(client, db, own_model):
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(3)])
    worker = new_worker(db, own_model)
    first, second, third = claim(db, worker, own_model, 3)
    complete(db, worker, [answer(first)])
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelled"
    with db.connect() as conn:
        assert sorted(queue.no_longer_owned(conn, worker, [first.id, second.id, third.id])) == [first.id, second.id, third.id]
    assert complete(db, worker, [answer(second)]) == {}
    counts = cancelled.request_counts
    assert (counts.completed, counts.failed, counts.total) == (1, 0, 3)
    output = client.files.content(cancelled.output_file_id).text.splitlines()
    errors = client.files.content(cancelled.error_file_id).text.splitlines()
    assert len(output) == 1 and len(errors) == 2


def test_expiry_keeps_what_finished(client, db, own_model):
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(3)], completion_window="1s")
    worker = new_worker(db, own_model)
    first, _ = claim(db, worker, own_model, 2)
    complete(db, worker, [answer(first)])
    time.sleep(1.2)
    finalize.expire_due(db)  # a running worker's housekeeping may be expiring it too: either way it ends
    expired = wait_for_batch(client, batch.id, timeout=10)
    assert expired.status == "expired" and expired.expired_at
    assert (expired.request_counts.completed, expired.request_counts.failed) == (1, 0)
    errors = [json.loads(line) for line in client.files.content(expired.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["r1", "r2"]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert len(client.files.content(expired.output_file_id).text.splitlines()) == 1


def test_a_claim_never_waits_for_a_batch_row_that_a_cancel_holds(client, db, own_model):
    """Cancel and expiry lock the batch, then its requests; a claim locks requests, then marks the
    batch in progress. Were the claim to wait for the batch here, the two would deadlock."""
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(3)])
    worker = new_worker(db, own_model)
    claimed: list = []
    with db.connect() as canceller:
        with canceller.begin():
            canceller.execute(sa.text("SELECT id FROM batches WHERE id = :b FOR UPDATE"), {"b": batch.id})
            claiming = threading.Thread(target=lambda: claimed.extend(claim(db, worker, own_model, 3)))
            claiming.start()
            claiming.join(10)
            assert not claiming.is_alive() and len(claimed) == 3  # it took the requests without waiting
            assert queue.start_cancel(canceller, batch.id)  # and the cancel goes on, taking them too
    assert statuses(db, batch.id) == {"cancelled": 3}
    assert complete(db, worker, [answer(claimed[0])]) == {}  # the claim's late result is refused
    finalize.finish(db, batch.id)


def test_a_batch_left_in_progress_with_nothing_to_run_is_finalized_by_housekeeping(client, db, own_model):
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(2)])
    worker = new_worker(db, own_model)
    # Stored as a worker does, but its process died before finalizing.
    complete(db, worker, [answer(request) for request in claim(db, worker, own_model, 2)])
    assert client.batches.retrieve(batch.id).status == "in_progress"
    housekeeping.run_once(db, Settings())
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts.completed == 2 and done.output_file_id


def test_crash_survivors_before_their_last_attempt_run_in_ordinary_groups(client, db, own_model):
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(4)])
    settings = Settings(max_attempts=3)
    for crash in (1, 2):
        crashed = new_worker(db, own_model)
        claimed = claim(db, crashed, own_model, 10, max_attempts=3)
        # After one crash all four run together again; after two, each is on its last attempt.
        assert [r.attempt for r in claimed] == ([1, 1, 1, 1] if crash == 1 else [2, 2, 2, 2])
        with db.begin() as conn:
            registry.mark_worker_dead(conn, crashed, DeathCause.EXITED)
        housekeeping.rescue(db, settings)
    worker = new_worker(db, own_model)
    for expected in ("r0", "r1", "r2", "r3"):
        [suspect] = claim(db, worker, own_model, 10, max_attempts=3)
        assert (suspect.custom_id, suspect.attempt) == (expected, 3) and suspect.is_last_attempt(3)
        complete(db, worker, [answer(suspect)])
    finalize.finalize_ready(db, [batch.id])
    assert client.batches.retrieve(batch.id).request_counts.completed == 4


def test_a_result_holding_nan_becomes_an_error_line_of_valid_json(client, db, own_model):
    batch = submit(client, [request_line("nan", own_model), request_line("fine", own_model)])
    worker = new_worker(db, own_model)
    nan, fine = claim(db, worker, own_model, 2)
    bad = Completion(id=nan.id, attempt=nan.attempt, status_code=200, prompt_tokens=1, completion_tokens=0,
                     response={"object": "list", "data": [{"embedding": [float("nan"), float("inf")]}]})
    complete(db, worker, [bad, answer(fine)])
    finalize.finalize_ready(db, [batch.id])
    done = client.batches.retrieve(batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    strict = {"parse_constant": lambda name: pytest.fail(f"{name} in an output line")}
    [line] = [json.loads(text, **strict) for text in client.files.content(done.error_file_id).text.splitlines()]
    assert line["custom_id"] == "nan" and line["response"]["status_code"] == 500
    assert line["response"]["body"]["error"]["code"] == "result_not_json"


def test_a_high_priority_flood_from_one_project_does_not_stop_another_projects_batch(
        client, project_client, db, own_model):
    low = submit(client, [request_line(f"low{i}", own_model) for i in range(5)])
    flood = [submit(client, [request_line(f"f{b}-{i}", own_model) for i in range(100)], extra_body={"priority": 100})
             for b in range(3)]
    other = submit(project_client, [request_line(f"o{i}", own_model) for i in range(10)])  # priority 0
    worker = new_worker(db, own_model)
    claims = [claim(db, worker, own_model, 8) for _ in range(3)]
    # Each claim shares itself between the two projects with queued work, whatever the priorities.
    assert [sum(r.batch_id == other.id for r in taken) for taken in claims] == [4, 4, 2]
    assert [len(taken) for taken in claims] == [8, 8, 8]  # the flood takes what the other leaves
    flooding = [r for taken in claims for r in taken if r.batch_id != other.id]
    # Within a project, priority then age: the flood's first batch before its low-priority one.
    assert [r.custom_id for r in flooding] == [f"f0-{i}" for i in range(14)]
    for batch in (low, *flood):
        client.batches.cancel(batch.id)
    project_client.batches.cancel(other.id)


def test_with_a_single_attempt_fresh_requests_are_claimed_and_a_crash_fails_them(client, db, own_model):
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(2)])
    crashed = new_worker(db, own_model)
    assert len(claim(db, crashed, own_model, 10, max_attempts=1)) == 2
    # Declared dead and rescued in one transaction: the session's other watchdogs and workers
    # (MAX_ATTEMPTS 3) would otherwise rescue them first, and queue them again.
    with db.begin() as conn:
        registry.mark_worker_dead(conn, crashed, DeathCause.EXITED)
        poisoned = queue.rescue(conn, None, max_attempts=1, host="test").poisoned_batches
    assert poisoned == [batch.id]
    finalize.finalize_ready(db, poisoned)
    assert client.batches.retrieve(batch.id).request_counts.failed == 2


def test_a_command_is_taken_once_and_only_by_the_watchdog_running_its_slot(db):
    from core.batch_app.domain.statuses import SlotCommand

    host = f"host-{time.monotonic_ns()}"
    with db.begin() as conn:
        registry.request_command(conn, host, "srv-a", SlotCommand.RESTART)
    with db.begin() as conn:  # another watchdog of the same host, or another host's
        assert registry.take_commands(conn, host, ["chat-0", "srv-b"]) == []
        assert registry.take_commands(conn, "elsewhere", ["srv-a"]) == []
    with db.begin() as conn:
        assert [(row.slot, row.command) for row in registry.take_commands(conn, host, ["srv-a"])] == \
            [("srv-a", SlotCommand.RESTART)]
        assert registry.take_commands(conn, host, ["srv-a"]) == []


def generic_plan(conn, statement: sa.TextClause) -> str:
    """The plan PostgreSQL keeps for `statement` prepared, whatever its parameters: psycopg
    prepares a statement it has run five times, and the server may then plan it once for all."""
    names = sorted(set(re.findall(r"(?<!:):(\w+)", statement.text)), key=len, reverse=True)
    sql = statement.text
    for number, name in enumerate(names, start=1):
        sql = re.sub(rf"(?<!:):{name}\b", f"${number}", sql)
    return "\n".join(conn.exec_driver_sql("EXPLAIN (GENERIC_PLAN) " + sql.replace("%", "%%")).scalars())


def test_no_statement_scans_the_requests_table_even_prepared_beside_a_long_history(database):
    """A claim, a cancel, an expiry, a pruning or a host's question whether work waits that
    scanned the whole requests table would slow down with every month of history kept: each
    reaches the rows it reads by index, also in the one plan PostgreSQL may keep for a prepared
    statement."""
    modules = [importlib.import_module(f"{domain.__name__}.{module.name}") for module in pkgutil.iter_modules(domain.__path__)]
    statements = {f"{module.__name__}.{name}": value for module in modules
                  for name, value in vars(module).items() if isinstance(value, sa.TextClause)}
    with scratch_database(database) as url:
        migrate(url)
        scratch = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with scratch.begin() as conn:  # one batch long finished, one queued
            for batch, status, count in (("batch_old", "completed", 30000), ("batch_new", "in_progress", 2000)):
                conn.execute(sa.text(
                    "INSERT INTO batches (id, project, endpoint, model, input_file_id, completion_window, status,"
                    " total, created_at) VALUES (:b, 'p', '/v1/chat/completions', 'm', 'file-x', '24h', :s, :n,"
                    " now())"), {"b": batch, "s": status, "n": count})
                conn.execute(sa.text(
                    "INSERT INTO batch_requests (batch_id, project, line, custom_id, model, body, status)"
                    " SELECT :b, 'p', g, 'r' || g, 'm', '{}', :r FROM generate_series(1, :n) g"),
                    {"b": batch, "n": count, "r": "succeeded" if status == "completed" else "queued"})
            conn.execute(sa.text("ANALYZE"))
        with scratch.connect() as conn:
            plans = {name: generic_plan(conn, statement) for name, statement in statements.items()}
        scratch.dispose()
    assert len(plans) > 50 and "core.batch_app.domain.queue._CLAIM_ORDINARY" in plans
    assert {name: plan for name, plan in plans.items() if "Seq Scan on batch_requests" in plan} == {}
