"""Per-project limits: what one project (a tenant) may hold at once, checked inside the
transactions that create files and batches, and refused with a 429 naming the limit.

- files stored (uploads and batch outputs, until deleted or expired): PROJECT_MAX_FILES, and
  their bytes: PROJECT_MAX_FILE_BYTES;
- unfinished batches: PROJECT_MAX_ACTIVE_BATCHES, and the requests they hold:
  PROJECT_MAX_ACTIVE_REQUESTS.

A project's creates take a transaction lock of that project's own just before the final count
and hold it until they commit, so two of its creates at once cannot both pass a limit; the
counts read only its rows (through `files_project_created` and `batches_project_unfinished`).
No other project waits on either: a project at its limit slows only itself. Batch outputs are never refused (a batch that ran
writes its results), they only count toward what the project may upload next.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..config import Settings
from .errors import LimitReached
from .statuses import FINAL_BATCH_STATUSES, sql_list
from .storage import LIVE_FILE

# One key per project and kind of object; pg_advisory_xact_lock ends with the transaction (and so
# works through a pooler in transaction mode).
_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:kind || ':' || :project, 0))")
_STORED = text(f"""
SELECT count(*) AS files, coalesce(sum(bytes), 0) AS bytes FROM files
WHERE project = :project AND {LIVE_FILE}""")
_UNFINISHED = text(f"""
SELECT count(*) AS batches, coalesce(sum(total), 0) AS requests FROM batches
WHERE project = :project AND status NOT IN ({sql_list(FINAL_BATCH_STATUSES)})""")


def lock(conn: Connection, kind: str, project: str) -> None:
    """The project's lock on its `kind` ("files" or "batches") until the transaction ends."""
    conn.execute(_LOCK, {"kind": kind, "project": project})


def check_files(conn: Connection, settings: Settings, project: str, *, written: bool) -> None:
    """Refuse a file past the project's files or bytes. Called before an upload is read
    (`written` False: room for one more file is needed, so a project at its limit is refused
    before it sends its body) and once its row holds its size (`written`: the project's lock is
    taken and the totals with it are what decides)."""
    if written:
        lock(conn, "files", project)
    stored = conn.execute(_STORED, {"project": project}).one()
    files, size = stored.files + (not written), stored.bytes + (not written)
    if files > settings.project_max_files:
        raise LimitReached(f"This project stores the most files it may (PROJECT_MAX_FILES = "
                           f"{settings.project_max_files}); delete some to upload more.", code="project_max_files")
    if size > settings.project_max_file_bytes:
        raise LimitReached(f"This project's files would hold {size} bytes, more than it may store "
                           f"(PROJECT_MAX_FILE_BYTES = {settings.project_max_file_bytes}); delete some to upload "
                           "more.", code="project_max_file_bytes")


def check_batches(conn: Connection, settings: Settings, project: str, *, new_requests: int | None) -> None:
    """Refuse a batch past the project's unfinished batches or their requests. Called before the
    batch is written (`new_requests` None: room for one more batch and request is needed, so a
    project at its limit is refused before its file is read) and once it is written with its
    request count (its row is counted; the project's lock, held until the batch is committed,
    makes this the count that decides). Ingests of one project still run side by side."""
    written = new_requests is not None
    if written:
        lock(conn, "batches", project)
    unfinished = conn.execute(_UNFINISHED, {"project": project}).one()
    batches = unfinished.batches + (not written)
    requests = unfinished.requests + (new_requests if written else 1)
    if batches > settings.project_max_active_batches:
        raise LimitReached(f"This project has the most unfinished batches it may (PROJECT_MAX_ACTIVE_BATCHES = "
                           f"{settings.project_max_active_batches}); wait for some to end or cancel them.",
                           code="project_max_active_batches")
    if requests > settings.project_max_active_requests:
        raise LimitReached(f"This project's unfinished batches would hold {requests} requests, more than it may "
                           f"queue (PROJECT_MAX_ACTIVE_REQUESTS = {settings.project_max_active_requests}); wait "
                           "for some to end or cancel them.", code="project_max_active_requests")
