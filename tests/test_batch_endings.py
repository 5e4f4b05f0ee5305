"""Every batch ending passes through queue.end_batch once: completed, failed at validation,
expired and cancelled each send exactly one ending notification, and ending an ended batch again
changes nothing."""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import psycopg
import sqlalchemy as sa

from core.batch_app.domain import finalize, queue
from core.batch_app.domain.statuses import BatchStatus

from .conftest import wait_for_batch
from .jsonl import request_line, submit, upload
from .simulated_worker import answer, claim, complete, new_worker


@contextlib.contextmanager
def ending_notices(database: str):
    """A listener on the ending channel; calling it returns the batch ids heard so far."""
    conninfo = sa.engine.make_url(database).set(drivername="postgresql").render_as_string(hide_password=False)
    heard: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"LISTEN {queue.BATCH_ENDED_CHANNEL}")

        def take(seconds: float) -> list[str]:
            heard.extend(notice.payload for notice in conn.notifies(timeout=seconds))
            return heard

        yield take


def batch_rows(db, batch_ids) -> dict:
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM batches WHERE id = ANY(:ids)"), {"ids": list(batch_ids)})
        return {row.id: row._asdict() for row in rows}


def test_each_ending_passes_through_end_batch_exactly_once(client, db, database, own_model):
    with ending_notices(database) as notices:
        done = submit(client, [request_line("done", own_model)])
        worker = new_worker(db, own_model)
        (request,) = claim(db, worker, own_model, 1)
        complete(db, worker, [answer(request)])
        finalize.finalize_ready(db, [done.id])
        refused = client.batches.create(input_file_id=upload(client, b"not json\n").id,
                                        endpoint="/v1/chat/completions", completion_window="24h")
        late = submit(client, [request_line("late", own_model)], completion_window="1s")
        cancelled = submit(client, [request_line("cancelled", own_model)])
        client.batches.cancel(cancelled.id)
        time.sleep(1.2)
        finalize.expire_due(db)  # another process's housekeeping may get there first: either way once
        ended = {batch.id: wait_for_batch(client, batch.id, timeout=15) for batch in (done, refused, late, cancelled)}
        assert {batch_id: batch.status for batch_id, batch in ended.items()} == {
            done.id: "completed", refused.id: "failed", late.id: "expired", cancelled.id: "cancelled"}
        assert ended[done.id].completed_at and ended[refused.id].failed_at
        assert ended[late.id].expired_at and ended[cancelled.id].cancelled_at
        assert ended[refused.id].errors.data[0].code == "invalid_json_line"
        heard = Counter(batch_id for batch_id in notices(1.0) if batch_id in ended)
        assert heard == {batch_id: 1 for batch_id in ended}

        before = batch_rows(db, ended)
        with db.begin() as conn:
            for batch_id in ended:
                for status in queue.ENDS_FROM:
                    assert not queue.end_batch(conn, batch_id, status, output_file_id="file-other",
                                               errors=[{"code": "other"}])
        assert batch_rows(db, ended) == before
        assert Counter(batch_id for batch_id in notices(0.5) if batch_id in ended) == heard


def test_a_batch_that_is_not_ready_cannot_be_ended(client, db, database, own_model):
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(2)])
    worker = new_worker(db, own_model)
    claim(db, worker, own_model, 1)
    with ending_notices(database) as notices:
        with db.begin() as conn:
            # in progress: neither completed (not finalizing) nor cancelled (not cancelling) nor failed
            for status in (BatchStatus.COMPLETED, BatchStatus.CANCELLED, BatchStatus.FAILED):
                assert not queue.end_batch(conn, batch.id, status)
        assert client.batches.retrieve(batch.id).status == "in_progress"
        assert batch.id not in notices(0.5)
    client.batches.cancel(batch.id)
