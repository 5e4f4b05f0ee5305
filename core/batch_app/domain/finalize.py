"""Ending a batch: build its output and error files and give it its final status, exactly once.

The files and the final status are written in the transaction that holds the batch row lock,
so a builder that dies leaves nothing behind and the next one (housekeeping) starts clean. The
status itself is set by `queue.end_batch`, the only way into a final status.
"""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..database import Database
from . import queue
from .batch_format import output_line
from .statuses import BatchStatus, RequestStatus
from .storage import FileWriter

log = logging.getLogger(__name__)

_RESULTS = text("""
SELECT line, custom_id, attempt, status, status_code, response, error::text AS error
FROM batch_requests WHERE batch_id = :batch_id ORDER BY line
""")

_OWNER = text("SELECT project, output_expires_after FROM batches WHERE id = :id")


def _build_files(conn: Connection, batch_id: str) -> tuple[str | None, str | None]:
    project, expires_in = conn.execute(_OWNER, {"id": batch_id}).one()
    writers = {
        name: FileWriter(conn, project=project, purpose="batch_output", filename=f"{batch_id}_{name}.jsonl")
        for name in ("output", "error")
    }
    rows = conn.execute(_RESULTS.execution_options(stream_results=True, yield_per=2000), {"batch_id": batch_id})
    for row in rows:
        line = output_line(batch_id, row.line, row.custom_id, row.attempt, row.status_code, row.response, row.error)
        writers["output" if row.status == RequestStatus.SUCCEEDED else "error"].write(line)
    # OpenAI leaves a file id null when that file would be empty.
    output, errors = (writer.close(expires_in)["id"] if writer.size else None for writer in writers.values())
    return output, errors


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
