"""Ending a batch: build its output and error files and give it its final status, exactly once.

The files and the final status are written in the transaction that holds the batch row lock,
so a builder that dies leaves nothing behind and the next one (housekeeping) starts clean. The
status itself is set by `queue.end_batch`, the only way into a final status.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..database import Database
from . import queue
from .batch_format import output_line
from .statuses import BatchStatus, RequestStatus
from .storage import FileWriter

log = logging.getLogger(__name__)

# In the order results were stored (unfinished ones, which end with the batch, last): the output
# file then continues the pages `GET /v1/batches/{id}/output` gave while the batch ran
# (queue.finished_so_far), and reading it after the end resumes them exactly. The order is found
# on narrow rows, then the results are read a group at a time by id: a sort of the results
# themselves would spill to disk for large ones.
_ORDER = text("SELECT id FROM batch_requests WHERE batch_id = :batch_id ORDER BY finished_xid NULLS LAST, id")
_RESULTS = text("""
SELECT id, line, custom_id, attempt, status, status_code, response, error::text AS error
FROM batch_requests WHERE id = ANY(:ids)
""")
_GROUP = 2000

_OWNER = text("SELECT project, output_expires_after FROM batches WHERE id = :id")
_KEEP_UNSUCCESSFUL = text("INSERT INTO unsuccessful_lines (batch_id, lines) VALUES (:batch_id, :lines)")


def _build_files(conn: Connection, batch_id: str) -> tuple[str | None, str | None]:
    """Write the batch's output and error files, and the line numbers a retry takes from its
    input file: from here on its results live there, and retention deletes its request rows."""
    project, expires_in = conn.execute(_OWNER, {"id": batch_id}).one()
    writers = {
        name: FileWriter(conn, project=project, purpose="batch_output", filename=f"{batch_id}_{name}.jsonl")
        for name in ("output", "error")
    }
    unsuccessful: list[int] = []
    for row in _in_finishing_order(conn, batch_id):
        line = output_line(batch_id, row.line, row.custom_id, row.attempt, row.status_code, row.response, row.error)
        if row.status == RequestStatus.SUCCEEDED:
            writers["output"].write(line)
        else:
            writers["error"].write(line)
            unsuccessful.append(row.line)
    if unsuccessful:
        conn.execute(_KEEP_UNSUCCESSFUL, {"batch_id": batch_id, "lines": sorted(unsuccessful)})
    # OpenAI leaves a file id null when that file would be empty.
    output, errors = (writer.close(expires_in)["id"] if writer.size else None for writer in writers.values())
    return output, errors


def _in_finishing_order(conn: Connection, batch_id: str) -> Iterator:
    order = conn.execute(_ORDER, {"batch_id": batch_id}).scalars().all()
    for start in range(0, len(order), _GROUP):
        ids = order[start:start + _GROUP]
        rows = {row.id: row for row in conn.execute(_RESULTS, {"ids": ids})}
        yield from (rows[id_] for id_ in ids)


def _end_with_files(conn: Connection, batch_id: str, status: BatchStatus) -> None:
    """Build the files of a batch whose row this transaction holds locked, and end it."""
    output_id, error_id = _build_files(conn, batch_id)
    queue.end_batch(conn, batch_id, status, output_file_id=output_id, error_file_id=error_id)
    log.info("batch %s %s (output %s, errors %s)", batch_id, status, output_id, error_id)


def finish(db: Database, batch_id: str) -> BatchStatus | None:
    """Build files for a `finalizing` or `cancelling` batch; returns its final status if we did."""
    with db.begin() as conn:
        final_status = queue.lock_for_files(conn, batch_id)
        if final_status is None:
            return None
        _end_with_files(conn, batch_id, final_status)
    return final_status


def start_finalizing(db: Database, batch_ids: list[str]) -> list[str]:
    """Move the given batches that have no unfinished request left to `finalizing`; returns
    those, which the caller then owns finishing."""
    with db.begin() as conn:
        return queue.start_finalizing(conn, batch_ids)


def finalize_ready(db: Database, batch_ids: list[str]) -> list[str]:
    """Finalize the given batches that have no unfinished request left."""
    ready = start_finalizing(db, batch_ids)
    for batch_id in ready:
        finish(db, batch_id)
    return ready


def cancel(db: Database, batch_id: str) -> bool:
    """Cancel a batch: unfinished requests end at once, the finished part is kept in its files."""
    with db.begin() as conn:
        started = queue.start_cancel(conn, batch_id)
    if started:
        finish(db, batch_id)
    return started


def expire_due(db: Database) -> list[str]:
    """Expire every batch past its completion window, keeping what finished."""
    expired: list[str] = []
    while True:
        with db.begin() as conn:
            batch_id = queue.lock_next_expired(conn)
            if batch_id is None:
                return expired
            _end_with_files(conn, batch_id, BatchStatus.EXPIRED)
        expired.append(batch_id)


def finish_stranded(db: Database, grace_seconds: float = 30.0) -> list[str]:
    """Finish batches whose file builder died mid-way (housekeeping)."""
    with db.connect() as conn:
        stranded = queue.stranded_batches(conn, grace_seconds)
    return [batch_id for batch_id in stranded if finish(db, batch_id)]
