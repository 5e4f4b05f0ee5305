"""Creating and reading batches: the Batch object as OpenAI's SDK expects it."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..config import Settings
from ..database import Database
from . import limits, queue
from .batch_format import ENDPOINTS, MAX_METADATA_KEY, MAX_METADATA_KEYS, MAX_METADATA_VALUE, LineError
from .errors import InvalidRequest, NoLiveWorker, NotFound
from .ids import new_id
from .ingest import IngestLimits, ingest_lines
from .line_policy import allowed_hosts
from .query import Query
from .registry import model_liveness
from .statuses import BatchStatus
from .storage import LIVE_FILE, expiry_seconds, iter_lines, read_chunks

_WINDOW = re.compile(r"^(\d+)([smh])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
TIMESTAMPS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
              "failed_at", "expired_at", "cancelling_at", "cancelled_at")


def window_seconds(completion_window: str, settings: Settings) -> int:
    """OpenAI's `24h`, or any `<n>s|m|h` window within the configured bounds (short windows help
    tests and urgent work)."""
    match = _WINDOW.match(completion_window or "")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0
    if not settings.min_completion_window <= seconds <= settings.max_completion_window:
        raise InvalidRequest(f"Invalid completion_window '{completion_window[:40]}': use '24h', or another "
                             f"duration from {settings.min_completion_window} s to "
                             f"{settings.max_completion_window // 3600} h such as '30m'.",
                             param="completion_window", code="invalid_value")
    return seconds


def check_metadata(metadata: dict[str, Any] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidRequest(f"metadata may hold at most {MAX_METADATA_KEYS} keys.", param="metadata",
                             code="invalid_value")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise InvalidRequest(f"metadata key '{key[:80]}' is longer than {MAX_METADATA_KEY} characters.",
                                 param="metadata", code="invalid_value")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise InvalidRequest(f"metadata value for '{key}' must be a string of at most "
                                 f"{MAX_METADATA_VALUE} characters.", param="metadata", code="invalid_value")


def create_batch(db: Database, settings: Settings, *, project: str, input_file_id: str,
                 endpoint: str, completion_window: str, metadata: dict[str, str] | None,
                 priority: int, output_expires_after: dict | None = None) -> str:
    """Validate and ingest the input file; returns the id of the new (maybe failed) batch."""
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(f"Unsupported endpoint '{endpoint}'; use one of {', '.join(ENDPOINTS)}.",
                             param="endpoint", code="invalid_value")
    window = window_seconds(completion_window, settings)
    check_metadata(metadata)
    output_expiry = expiry_seconds(output_expires_after, settings, "output_expires_after")
    batch_id = new_id("batch_")
    with db.begin() as conn:
        # Held until the batch is made: a delete of the file waits rather than cut the ingest short.
        purpose = conn.execute(text(f"SELECT purpose FROM files WHERE id = :id AND project = :project "
                                    f"AND {LIVE_FILE} FOR KEY SHARE"), {"id": input_file_id, "project": project}).scalar()
        if purpose is None:
            raise NotFound("file", input_file_id, "input_file_id")
        if purpose != "batch":
            raise InvalidRequest(f"File '{input_file_id}' has purpose '{purpose}'; a batch needs a file "
                                 "uploaded with purpose 'batch'.", param="input_file_id", code="invalid_value")
        limits.check_batches(conn, settings, project, new_requests=None)
        conn.execute(text("""
            INSERT INTO batches (id, project, endpoint, input_file_id, completion_window, status,
                                 priority, metadata, expires_at, output_expires_after)
            VALUES (:id, :project, :endpoint, :file, :window, :status, :priority,
                    CAST(:metadata AS jsonb), now() + make_interval(secs => :seconds), :output_expiry)"""),
            {"id": batch_id, "project": project, "endpoint": endpoint, "file": input_file_id,
             "window": completion_window, "status": BatchStatus.VALIDATING, "priority": priority, "seconds": window,
             "metadata": json.dumps(metadata) if metadata is not None else None, "output_expiry": output_expiry})
        requests = conn.begin_nested()
        # The file is read on this transaction's own connection: a create holds one connection, never
        # one while waiting for a second (which, under many creates at once, would drain the pool).
        result = ingest_lines(conn, iter_lines(read_chunks(conn, input_file_id), settings.max_line_bytes),
                              batch_id=batch_id, project=project, endpoint=endpoint, priority=priority,
                              limits=IngestLimits(settings.max_file_lines, settings.max_line_bytes,
                                                  settings.max_choices, settings.max_inputs,
                                                  allowed_hosts(settings.media_url_allowed_hosts)))
        errors = result.errors or _model_errors(conn, settings, result.model, result.model_line)
        if not errors:
            limits.check_batches(conn, settings, project, new_requests=result.total)
        if errors:
            requests.rollback()
        else:
            requests.commit()
        conn.execute(text("UPDATE batches SET model = :model, total = :total WHERE id = :id"),
                     {"id": batch_id, "model": result.model, "total": 0 if errors else result.total})
        if errors:
            queue.end_batch(conn, batch_id, BatchStatus.FAILED, errors=[e.as_dict() for e in errors])
        else:
            queue.announce_work(conn)
    return batch_id


def _model_errors(conn: Connection, settings: Settings, model: str | None,
                  line: int | None) -> list[LineError]:
    """A model nobody serves fails the batch; one whose workers are all down refuses it (503)."""
    liveness = model_liveness(conn, settings.heartbeat_timeout)
    if model not in liveness:
        served = ", ".join(sorted(liveness)) or "none yet"
        return [LineError("model_not_found", f"Model '{model}' is not served here (served: {served}).",
                          line, "body.model")]
    live, no_backend, last_seen_age = liveness[model]
    if settings.require_live_worker and not live and no_backend:
        raise NoLiveWorker(f"No backend serving model '{model}' is healthy (see `batchctl backends`).",
                           code="worker_offline")
    if settings.require_live_worker and not live:
        raise NoLiveWorker(f"Worker offline (last seen {int(last_seen_age)} s ago) for model '{model}'.",
                           code="worker_offline")
    return []


# Batch rows with their counts and usage, which batch_progress keeps as results are stored: one
# statement whatever the batches' sizes, so a read sees a row and its counts at one instant.
# PostgreSQL sums bigints as numeric, which reaches Python as Decimal and JSON as a string:
# every count is cast back to bigint so it is a JSON integer, as OpenAI's schema types it.
_WITH_PROGRESS = """
SELECT b.*, p.completed, p.failed, p.input_tokens, p.output_tokens FROM ({batches}) b
CROSS JOIN LATERAL (
    SELECT coalesce(sum(completed), 0)::bigint AS completed, coalesce(sum(failed), 0)::bigint AS failed,
           coalesce(sum(input_tokens), 0)::bigint AS input_tokens,
           coalesce(sum(output_tokens), 0)::bigint AS output_tokens
    FROM batch_progress WHERE batch_id = b.id) p
"""


def _batch_object(row) -> dict[str, Any]:
    body = {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "model": row.model,
        "errors": row.errors,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
        "usage": {"input_tokens": row.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": row.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": row.input_tokens + row.output_tokens},
        "metadata": row.metadata,
    }
    for name in TIMESTAMPS:
        value = getattr(row, name)
        body[name] = int(value.timestamp()) if value is not None else None
    body["estimated_completion_at"] = _estimated_completion(row)
    return body


def _estimated_completion(row) -> int | None:
    """Not in OpenAI's object (the SDK keeps it as an extra): when a running batch should end, at
    its own pace since it started (read to the microsecond: a batch of seconds is paced right)."""
    done = row.completed + row.failed
    if row.status != BatchStatus.IN_PROGRESS or row.in_progress_at is None or not done:
        return None
    now = time.time()
    elapsed = max(now - row.in_progress_at.timestamp(), 0.001)
    return round(now + (row.total - done) * elapsed / done)


_GET_BATCH = _WITH_PROGRESS.format(batches="SELECT * FROM batches WHERE id = %(id)s AND project = %(project)s")


def get_batch(project: str, batch_id: str) -> Query[dict[str, Any]]:
    def batch(rows: list) -> dict[str, Any]:
        if not rows:
            raise NotFound("batch", batch_id, "batch_id")
        return _batch_object(rows[0])

    return Query(_GET_BATCH, {"id": batch_id, "project": project}, batch)


# Newest first; `after` is the id of the last batch of the previous page. A statement for each
# shape of the call, so that each reads one page of its index (batches_project_newest, or
# batches_newest for every project) rather than a plan that must allow for either shape.
def _page_sql(in_project: bool, paged: bool) -> str:
    scope = "project = %(project)s" if in_project else "TRUE"
    after = (f"AND (created_at, id) < (SELECT created_at, id FROM batches WHERE id = %(after)s AND {scope})"
             if paged else "")
    page = f"SELECT * FROM batches WHERE {scope} {after} ORDER BY created_at DESC, id DESC LIMIT %(limit)s"
    return _WITH_PROGRESS.format(batches=page) + "ORDER BY b.created_at DESC, b.id DESC"


_LIST_BATCHES = {(in_project, paged): _page_sql(in_project, paged) for in_project in (True, False)
                 for paged in (True, False)}


def list_batches(project: str | None, after: str | None, limit: int) -> Query[dict[str, Any]]:
    """A page of a project's batches, or of every project's with `project` None."""
    def page(rows: list) -> dict[str, Any]:
        data = [_batch_object(row) for row in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    return Query(_LIST_BATCHES[project is not None, after is not None],
                 {"project": project, "after": after, "limit": limit + 1}, page)
