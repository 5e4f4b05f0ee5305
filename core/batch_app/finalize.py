"""Ending a batch: build its output and error files and set its final status, exactly once.

The files and the final status are written in the transaction that holds the batch row lock,
so a builder that dies leaves nothing behind and the next one (housekeeping) starts clean.
"""

from __future__ import annotations

import hashlib
import json
import logging

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from . import queue
from .storage import FileWriter

log = logging.getLogger(__name__)

_RESULTS = text("""
SELECT line, custom_id, attempt, status, status_code, response, error::text AS error
FROM batch_requests WHERE batch_id = :batch_id ORDER BY line
""")


def _line_id(prefix: str, *parts: object) -> str:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:24]
    return f"{prefix}{digest}"


def _output_line(batch_id: str, row) -> bytes:
    """One line in OpenAI's batch output format; the stored JSON is spliced in as text."""
    response = "null"
    if row.response is not None:
        request_id = _line_id("req_", batch_id, row.line, row.attempt)
        response = (f'{{"status_code": {row.status_code}, "request_id": "{request_id}", '
                    f'"body": {row.response}}}')
    return (f'{{"id": "{_line_id("batch_req_", batch_id, row.line)}", '
            f'"custom_id": {json.dumps(row.custom_id)}, '
            f'"response": {response}, "error": {row.error or "null"}}}\n').encode()


def _build_files(conn: Connection, batch_id: str, project: str) -> tuple[str | None, str | None]:
    writers = {
        name: FileWriter(conn, project=project, purpose="batch_output", filename=f"{batch_id}_{name}.jsonl")
        for name in ("output", "error")
    }
    rows = conn.execute(_RESULTS.execution_options(stream_results=True, yield_per=2000), {"batch_id": batch_id})
    for row in rows:
        writers["output" if row.status == "succeeded" else "error"].write(_output_line(batch_id, row))
    # OpenAI leaves a file id null when that file would be empty.
    output, errors = (writer.close()["id"] if writer.size else None for writer in writers.values())
    return output, errors


def _project(conn: Connection, batch_id: str) -> str:
    return conn.execute(text("SELECT project FROM batches WHERE id = :id"), {"id": batch_id}).scalar_one()


def finish(engine: Engine, batch_id: str) -> str | None:
    """Build files for a `finalizing` or `cancelling` batch; returns its final status if we did."""
    with engine.begin() as conn:
        final_status = queue.lock_for_files(conn, batch_id)
        if final_status is None:
            return None
        output_id, error_id = _build_files(conn, batch_id, _project(conn, batch_id))
        queue.set_final(conn, batch_id, final_status, output_id, error_id)
    log.info("batch %s %s (output %s, errors %s)", batch_id, final_status, output_id, error_id)
    return final_status


def finalize_ready(engine: Engine, batch_ids: list[str]) -> list[str]:
    """Finalize the given batches that have no unfinished request left."""
    with engine.begin() as conn:
        ready = queue.start_finalizing(conn, batch_ids)
    for batch_id in ready:
        finish(engine, batch_id)
    return ready


def cancel(engine: Engine, batch_id: str) -> bool:
    """Cancel a batch: unfinished requests end at once, the finished part is kept in its files."""
    with engine.begin() as conn:
        started = queue.start_cancel(conn, batch_id)
    if started:
        finish(engine, batch_id)
    return started


def expire_due(engine: Engine) -> list[str]:
    """Expire every batch past its completion window, keeping what finished."""
    expired: list[str] = []
    while True:
        with engine.begin() as conn:
            batch_id = queue.lock_next_expired(conn)
            if batch_id is None:
                return expired
            output_id, error_id = _build_files(conn, batch_id, _project(conn, batch_id))
            queue.set_final(conn, batch_id, "expired", output_id, error_id)
        log.info("batch %s expired (output %s, errors %s)", batch_id, output_id, error_id)
        expired.append(batch_id)


def finish_stranded(engine: Engine, grace_seconds: float = 30.0) -> list[str]:
    """Finish batches whose file builder died mid-way (housekeeping)."""
    with engine.connect() as conn:
        stranded = queue.stranded_batches(conn, grace_seconds)
    return [batch_id for batch_id in stranded if finish(engine, batch_id)]
