"""Migrations run from an empty database to head and back, and match tables.py exactly; the
status checks go onto a database that already holds rows of every status."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from alembic import command

from core.batch_app.database import alembic_config, migrate
from core.batch_app.domain.statuses import (
    FINAL_BATCH_STATUSES,
    UNFINISHED_REQUEST_STATUSES,
    BatchStatus,
    RequestStatus,
    WorkerStatus,
)
from core.batch_app.domain.tables import metadata

from .conftest import scratch_database


@contextlib.contextmanager
def database_at(database: str, revision: str) -> Iterator[tuple[str, sa.Engine]]:
    """A scratch database migrated to `revision`: its URL and an engine on it."""
    with scratch_database(database) as url:
        command.upgrade(alembic_config(url), revision)
        scratch = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            yield url, scratch
        finally:
            scratch.dispose()


def check_constraints(db) -> dict[str, str]:
    with db.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'c'")).all())


def test_empty_database_to_head_without_drift_and_back(database):
    with scratch_database(database) as url, scratch_database(database) as from_tables:
        migrate(url)
        scratch = sa.create_engine(url, poolclass=sa.pool.NullPool)
        assert set(sa.inspect(scratch).get_table_names()) == set(metadata.tables) | {"alembic_version"}
        command.check(alembic_config(url))  # raises when the revisions and tables.py disagree
        # alembic's check does not compare CHECK constraints: compare them with tables.py's own.
        reference = sa.create_engine(from_tables, poolclass=sa.pool.NullPool)
        metadata.create_all(reference)
        assert check_constraints(scratch) == check_constraints(reference) != {}
        reference.dispose()
        migrate(url)  # running again is a no-op
        command.downgrade(alembic_config(url), "base")
        assert set(sa.inspect(scratch).get_table_names()) == {"alembic_version"}
        scratch.dispose()


# The worker statuses revision 0003 knew (0007 adds no_backend).
WORKER_STATUSES_AT_0003 = [status for status in WorkerStatus if status != WorkerStatus.NO_BACKEND]


def _insert_every_status(conn) -> None:
    for status in BatchStatus:
        conn.execute(sa.text("""
            INSERT INTO batches (id, project, endpoint, input_file_id, completion_window, status)
            VALUES (:id, 'p', '/v1/chat/completions', 'file-x', '24h', :status)"""),
            {"id": f"batch_{status}", "status": status})
    for line, status in enumerate(RequestStatus, 1):
        conn.execute(sa.text("""
            INSERT INTO batch_requests (batch_id, line, custom_id, model, body, status)
            VALUES ('batch_in_progress', :line, :custom_id, 'm', '{}', :status)"""),
            {"line": line, "custom_id": f"r{line}", "status": status})
    for status in WORKER_STATUSES_AT_0003:
        _insert_worker(conn, status)


def _insert_worker(conn, status: str) -> None:
    conn.execute(sa.text("""
        INSERT INTO workers (id, slot, host, pid, model, status)
        VALUES (:id, :slot, 'h', 1, 'm', :status)"""), {"id": str(uuid.uuid4()), "slot": status, "status": status})


def test_status_checks_apply_to_a_database_holding_every_status(database):
    with database_at(database, "0002") as (url, scratch):
        with scratch.begin() as conn:
            _insert_every_status(conn)
        migrate(url)
        with scratch.connect() as conn:
            counts = conn.execute(sa.text("SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM "
                                          "batch_requests), (SELECT count(*) FROM workers)")).one()
            assert tuple(counts) == (len(BatchStatus), len(RequestStatus), len(WORKER_STATUSES_AT_0003))
        with scratch.begin() as conn:  # a status added since is accepted at head
            _insert_worker(conn, WorkerStatus.NO_BACKEND)
        for table, column_values in (("batches", "status = 'done'"), ("batch_requests", "status = 'done'"),
                                     ("workers", "status = 'asleep'")):
            with pytest.raises(sa.exc.IntegrityError, match=f"{table}_status_known"):
                with scratch.begin() as conn:
                    conn.execute(sa.text(f"UPDATE {table} SET {column_values}"))
        command.downgrade(alembic_config(url), "0002")
        with scratch.begin() as conn:  # and off again
            conn.execute(sa.text("UPDATE workers SET status = 'asleep'"))


def test_progress_counts_are_carried_over_from_stored_results(database):
    with database_at(database, "0003") as (url, scratch):
        worker = str(uuid.uuid4())
        with scratch.begin() as conn:
            conn.execute(sa.text("""
                INSERT INTO batches (id, project, endpoint, input_file_id, completion_window, status)
                VALUES ('batch_old', 'p', '/v1/chat/completions', 'file-x', '24h', 'in_progress')"""))
            for line, (status, tokens) in enumerate([("succeeded", 3), ("succeeded", 4), ("failed", 5),
                                                     ("queued", 0), ("cancelled", 0)], 1):
                conn.execute(sa.text("""
                    INSERT INTO batch_requests (batch_id, line, custom_id, model, body, status, worker_id,
                                                prompt_tokens, completion_tokens)
                    VALUES ('batch_old', :line, :line, 'm', '{}', :status, :worker, :tokens, 2 * :tokens)"""),
                    {"line": line, "status": status, "worker": worker if tokens else None, "tokens": tokens})
        migrate(url)
        with scratch.connect() as conn:
            row = conn.execute(sa.text("SELECT * FROM batch_progress")).one()
        assert (row.batch_id, str(row.worker_id), row.completed, row.failed, row.input_tokens, row.output_tokens) == \
            ("batch_old", worker, 2, 1, 12, 24)


def test_crashes_are_carried_over_from_the_attempts_of_requests_still_to_run(database):
    with database_at(database, "0005") as (url, scratch):
        with scratch.begin() as conn:
            conn.execute(sa.text("""
                INSERT INTO batches (id, project, endpoint, input_file_id, completion_window, status)
                VALUES ('batch_old', 'p', '/v1/chat/completions', 'file-x', '24h', 'in_progress')"""))
            for line, (status, attempt) in enumerate([("queued", 0), ("queued", 2), ("running", 1), ("running", 3),
                                                      ("succeeded", 1)], 1):
                conn.execute(sa.text("""
                    INSERT INTO batch_requests (batch_id, line, custom_id, model, project, body, status, attempt)
                    VALUES ('batch_old', :line, :line, 'm', 'p', '{}', :status, :attempt)"""),
                    {"line": line, "status": status, "attempt": attempt})
        migrate(url)
        with scratch.connect() as conn:
            crashes = conn.execute(sa.text("SELECT crashes FROM batch_requests ORDER BY line")).scalars().all()
        assert crashes == [0, 2, 0, 2, 0]
        command.downgrade(alembic_config(url), "0005")


def test_workers_of_the_previous_head_are_worker_slots(database):
    with database_at(database, "0007") as (url, scratch):
        with scratch.begin() as conn:
            conn.execute(sa.text("""
                INSERT INTO workers (id, slot, host, pid, model, status)
                VALUES (gen_random_uuid(), 'chat-0', 'h', 1, 'm', 'idle')"""))
        migrate(url)
        with scratch.begin() as conn:
            assert conn.execute(sa.text("SELECT kind, probe FROM workers")).one() == ("worker", "")
            conn.execute(sa.text("INSERT INTO slot_commands (host, slot, command) VALUES ('h', 'srv-0', 'restart')"))
            with pytest.raises(sa.exc.IntegrityError):
                with conn.begin_nested():
                    conn.execute(sa.text("UPDATE workers SET kind = 'other'"))
        command.downgrade(alembic_config(url), "0007")


def test_results_of_running_batches_are_listed_first_after_the_upgrade(database):
    with database_at(database, "0008") as (url, scratch):
        with scratch.begin() as conn:
            for batch, status in (("batch_running", "in_progress"), ("batch_done", "completed")):
                conn.execute(sa.text("""
                    INSERT INTO batches (id, project, endpoint, input_file_id, completion_window, status)
                    VALUES (:id, 'p', '/v1/chat/completions', 'file-x', '24h', :status)"""), {"id": batch, "status": status})
                for line, request_status in enumerate(["succeeded", "queued"], 1):
                    conn.execute(sa.text("""
                        INSERT INTO batch_requests (batch_id, line, custom_id, model, project, body, status)
                        VALUES (:batch, :line, :line, 'm', 'p', '{}', :status)"""),
                        {"batch": batch, "line": line, "status": request_status})
        migrate(url)
        with scratch.connect() as conn:
            rows = conn.execute(sa.text("SELECT batch_id, line, finished_xid FROM batch_requests "
                                        "ORDER BY batch_id, line")).all()
        assert [tuple(row) for row in rows] == [("batch_done", 1, None), ("batch_done", 2, None),
                                                ("batch_running", 1, 0), ("batch_running", 2, None)]
        command.downgrade(alembic_config(url), "0008")


def test_batches_are_listed_newest_first_from_their_index_after_the_upgrade(database):
    from core.batch_app.domain.batches import list_batches
    from core.batch_app.domain.query import run

    with database_at(database, "0011") as (url, scratch):
        with scratch.begin() as conn:
            conn.execute(sa.text("""
                INSERT INTO batches (id, project, endpoint, input_file_id, completion_window, status, created_at)
                SELECT 'batch_' || g, 'p' || (g % 2), '/v1/chat/completions', 'file-x', '24h', 'completed',
                       now() - g * interval '1 minute'
                FROM generate_series(1, 2000) g"""))
        migrate(url)
        with scratch.connect() as conn:
            first = run(conn, list_batches("p1", None, 3))
            second = run(conn, list_batches("p1", first["last_id"], 3))
            everyone = run(conn, list_batches(None, None, 2))
            conn.execute(sa.text("SET enable_seqscan = off"))  # as on a table too large to scan
            plan = "\n".join(conn.exec_driver_sql("EXPLAIN " + list_batches("p1", None, 3).sql,
                                                  {"project": "p1", "limit": 4}).scalars())
        assert [b["id"] for b in first["data"] + second["data"]] == [f"batch_{g}" for g in (1, 3, 5, 7, 9, 11)]
        assert [b["id"] for b in everyone["data"]] == ["batch_1", "batch_2"] and everyone["has_more"]
        assert "batches_project_newest" in plan and "Sort" not in plan.split("batch_progress")[0]
        command.downgrade(alembic_config(url), "0011")


def test_dead_workers_keep_whether_their_deaths_were_charged_as_causes(database):
    with database_at(database, "0015") as (url, scratch):
        with scratch.begin() as conn:
            for slot, status, blames in (("crashed", "dead", True), ("killed", "dead", False), ("live", "idle", True)):
                conn.execute(sa.text("""
                    INSERT INTO workers (id, slot, host, pid, model, status, blames_requests)
                    VALUES (gen_random_uuid(), :slot, 'h', 1, 'm', :status, :blames)"""),
                    {"slot": slot, "status": status, "blames": blames})
        migrate(url)
        with scratch.connect() as conn:
            causes = conn.execute(sa.text("SELECT w.slot, d.cause, d.requests FROM workers w "
                                          "LEFT JOIN worker_deaths d ON d.worker_id = w.id ORDER BY w.slot")).all()
            assert "blames_requests" not in {c["name"] for c in sa.inspect(conn).get_columns("workers")}
        assert [tuple(row) for row in causes] == [("crashed", "exited", 0), ("killed", "killed", 0),
                                                  ("live", None, None)]
        command.downgrade(alembic_config(url), "0015")
        with scratch.connect() as conn:
            blames = conn.execute(sa.text("SELECT slot, blames_requests FROM workers ORDER BY slot")).all()
        assert [tuple(row) for row in blames] == [("crashed", True), ("killed", False), ("live", True)]


def test_finished_batches_become_compact_and_running_ones_keep_working_after_the_upgrade(database):
    from core.batch_app.domain import queue, registry, retention

    with database_at(database, "0012") as (url, scratch):
        with scratch.begin() as conn:
            for status in BatchStatus:
                conn.execute(sa.text("""
                    INSERT INTO batches (id, project, endpoint, input_file_id, completion_window, status, completed_at)
                    VALUES (:id, 'p', '/v1/chat/completions', 'file-x', '24h', :status, now())"""),
                    {"id": f"batch_{status}", "status": status})
                # A finished batch has only finished requests; the others any.
                statuses = [s for s in RequestStatus if status not in FINAL_BATCH_STATUSES
                            or s not in UNFINISHED_REQUEST_STATUSES]
                for line, request_status in enumerate(statuses, 1):
                    conn.execute(sa.text("""
                        INSERT INTO batch_requests (batch_id, line, custom_id, model, project, body, status)
                        VALUES (:batch, :line, :line, 'm', 'p', '{}', :status)"""),
                        {"batch": f"batch_{status}", "line": line, "status": request_status})
        migrate(url)
        finished = [s for s in RequestStatus if s not in UNFINISHED_REQUEST_STATUSES]
        unsuccessful = [line for line, status in enumerate(finished, 1) if status != RequestStatus.SUCCEEDED]
        worker = str(uuid.uuid4())
        with scratch.begin() as conn:
            lines = dict(conn.execute(sa.text("SELECT batch_id, lines FROM unsuccessful_lines")).all())
            assert lines == {f"batch_{status}": unsuccessful for status in FINAL_BATCH_STATUSES}
            registry.register_worker(conn, worker_id=worker, slot="w", host="h", pid=1, model="m", gpu_ids="")
            claimed = queue.claim(conn, worker, "m", 100, engine_idle=True, max_attempts=3)
            # Queued requests of unfinished batches are claimed as before.
            assert sorted(r.batch_id for r in claimed) == sorted(
                f"batch_{s}" for s in BatchStatus if s not in FINAL_BATCH_STATUSES)
        for _ in range(len(FINAL_BATCH_STATUSES) + 1):
            with scratch.begin() as conn:
                if batch_id := retention.next_finished_batch(conn, 0):
                    retention.delete_finished_requests(conn, batch_id, 100)
        with scratch.connect() as conn:
            left = dict(conn.execute(sa.text("SELECT batch_id, count(*) FROM batch_requests GROUP BY 1")).all())
        assert left == {f"batch_{s}": len(RequestStatus) for s in BatchStatus if s not in FINAL_BATCH_STATUSES}
        command.downgrade(alembic_config(url), "0012")


def test_request_bodies_keep_the_order_they_were_written_in_after_the_upgrade(database):
    from core.batch_app.domain import queue, registry

    written = '{"messages": [], "model": "m", "tools": [{"type": "function", "function": {"name": "f", "parameters": ' \
              '{"type": "object", "properties": {"city": {}, "country_code": {}, "day": {}}}}}]}'
    with database_at(database, "0017") as (url, scratch):
        insert = sa.text("INSERT INTO batch_requests (batch_id, line, custom_id, model, project, body) "
                         "VALUES ('batch_order', :line, :line, 'm', 'p', :body)")
        with scratch.begin() as conn:
            conn.execute(sa.text("INSERT INTO batches (id, project, endpoint, input_file_id, completion_window, "
                                 "status) VALUES ('batch_order', 'p', '/v1/chat/completions', 'f', '24h', 'in_progress')"))
            conn.execute(insert, {"line": 1, "body": written})  # before: jsonb reorders it
        migrate(url)
        worker = str(uuid.uuid4())
        with scratch.begin() as conn:
            conn.execute(insert, {"line": 2, "body": written})
            registry.register_worker(conn, worker_id=worker, slot="w", host="h", pid=1, model="m", gpu_ids="")
            bodies = {r.custom_id: r.body for r in queue.claim(conn, worker, "m", 10, engine_idle=True, max_attempts=3)}
        properties = {line: list(body["tools"][0]["function"]["parameters"]["properties"]) for line, body in bodies.items()}
        # jsonb kept the shortest keys first; json keeps the line's order.
        assert properties == {"1": ["day", "city", "country_code"], "2": ["city", "country_code", "day"]}
        assert list(bodies["2"]) == ["messages", "model", "tools"]
        command.downgrade(alembic_config(url), "0017")


def test_backends_of_the_previous_head_report_a_fixed_allowance(database):
    from core.batch_app.domain import overview, registry

    with database_at(database, "0018") as (url, scratch):
        worker = str(uuid.uuid4())
        with scratch.begin() as conn:
            conn.execute(sa.text("INSERT INTO workers (id, slot, host, pid, model, status) "
                                 "VALUES (:id, 'pool-m', 'h', 1, 'm', 'idle')"), {"id": worker})
            conn.execute(sa.text("INSERT INTO backends (worker_id, url, model, state) "
                                 "VALUES (:id, 'http://a:8000', 'm', 'healthy')"), {"id": worker})
        migrate(url)
        with scratch.begin() as conn:
            (before,) = overview.backends(conn)
            assert (before.url, before.allowance, before.allowance_reason) == ("http://a:8000", None, "")
            assert overview.describe_allowance(before) == "fixed"
            state = SimpleNamespace(url="http://a:8000", state="healthy", in_flight=3, completed=7, errors={},
                                    last_error="", checked_at=None, allowance=5,
                                    allowance_reason="interactive_within_target: interactive traffic 0.2 s ago")
            registry.report_backends(conn, worker, "m", [state])
            (after,) = overview.backends(conn)
        assert (after.in_flight, after.allowance) == (3, 5)
        assert overview.describe_allowance(after) == "5 (interactive_within_target: interactive traffic 0.2 s ago)"
        command.downgrade(alembic_config(url), "0018")
