"""A batch's results for those who read them before or after its end: pages of its output while it
runs (from its request rows) and once it has ended (from its output file), and retries of its
unsuccessful lines (from its input file).

A finished batch's results live in its files alone: retention deletes its request rows
(watchdog/retention.py), so nothing here reads a finished batch's rows, and a deleted or expired
file is gone for these too.
"""

from __future__ import annotations

from sqlalchemy import text

from ..config import Settings
from ..database import Database
from . import limits, queue
from .batch_format import FINAL_STATUSES, MAX_METADATA_KEYS, output_line
from .batches import create_batch, get_batch
from .errors import Conflict, Gone, NotFound
from .query import run
from .storage import LIVE_FILE, FileWriter, iter_chunks, iter_lines, page_of_lines, read_chunks

_IS_LIVE = text(f"SELECT EXISTS (SELECT 1 FROM files WHERE id = :id AND {LIVE_FILE})")


def _is_live(db: Database, file_id: str) -> bool:
    with db.connect() as conn:
        return conn.execute(_IS_LIVE, {"id": file_id}).scalar()


def output_page(db: Database, project: str, batch_id: str, after: int, limit: int,
                max_bytes: int) -> tuple[bytes, int]:
    """The succeeded lines after the first `after`, in the order they finished: at most `limit`
    and about `max_bytes` (at least one line). Returns them and how many they are."""
    # One snapshot: a batch seen running still has, in it, every row it had finished (retention
    # deletes rows only of ended batches).
    with db.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
        batch = run(conn, get_batch(project, batch_id))
        if batch["status"] not in FINAL_STATUSES:
            return _page_of_rows(conn, batch_id, after, limit, max_bytes)
    file_id = batch["output_file_id"]
    if file_id is None:  # no line succeeded
        return b"", 0
    gone = Gone(f"The output file '{file_id}' of batch '{batch_id}' was deleted or has expired.",
                param="batch_id", code="output_file_gone")
    if not _is_live(db, file_id):
        raise gone
    page, count = page_of_lines(iter_chunks(db, file_id), after, limit, max_bytes)
    if not count and not _is_live(db, file_id):  # deleted while read
        raise gone
    return page, count


def _page_of_rows(conn, batch_id: str, after: int, limit: int, max_bytes: int) -> tuple[bytes, int]:
    page, count = bytearray(), 0
    for row in queue.finished_so_far(conn, batch_id, after, limit):
        line = output_line(batch_id, row.line, row.custom_id, row.attempt, row.status_code, row.response, None)
        if count and len(page) + len(line) > max_bytes:
            break
        page += line
        count += 1
    return bytes(page), count


# The batch with its unsuccessful line numbers.
_PARENT = text("""
SELECT b.*, u.lines FROM batches b LEFT JOIN unsuccessful_lines u ON u.batch_id = b.id
WHERE b.id = :id AND b.project = :project
""")
# Held until the retry's file is written: a delete of the input file waits for the copy.
_HOLD_INPUT = text(f"SELECT 1 FROM files WHERE id = :id AND {LIVE_FILE} FOR KEY SHARE")
RETRY_OF = "retry_of"  # the metadata key naming the batch a retry was made from


def retry_batch(db: Database, settings: Settings, *, project: str, batch_id: str) -> str:
    """A new batch of the failed, expired and cancelled lines of a finished batch, as they are in
    its input file, with the same endpoint, window, priority and output expiry, its metadata
    naming the parent (`retry_of`). Returns the new batch's id."""
    with db.begin() as conn:
        parent = conn.execute(_PARENT, {"id": batch_id, "project": project}).first()
        if parent is None:
            raise NotFound("batch", batch_id, "batch_id")
        if parent.status not in FINAL_STATUSES:
            raise Conflict(f"Batch '{batch_id}' is {parent.status}: only a finished batch can be retried.",
                           param="batch_id", code="batch_not_finished")
        if not parent.lines:
            raise Conflict(f"Batch '{batch_id}' has no failed, expired or cancelled line to retry.",
                           param="batch_id", code="nothing_to_retry")
        if not conn.execute(_HOLD_INPUT, {"id": parent.input_file_id}).first():
            raise Conflict(f"The input file '{parent.input_file_id}' of batch '{batch_id}' was deleted or has "
                           "expired: its lines cannot be retried.", param="input_file_id", code="input_file_gone")
        lines = set(parent.lines)
        limits.check_files(conn, settings, project, written=False)
        writer = FileWriter(conn, project=project, purpose="batch", filename=f"retry-of-{batch_id}.jsonl")
        for line in iter_lines(read_chunks(conn, parent.input_file_id), settings.max_line_bytes):
            if line.number in lines:
                writer.write(line.data + b"\n")
        writer.close()
        limits.check_files(conn, settings, project, written=True)
    metadata = {**(parent.metadata or {}), RETRY_OF: batch_id}
    if len(metadata) > MAX_METADATA_KEYS:
        metadata = {RETRY_OF: batch_id}
    return create_batch(db, settings, project=project, input_file_id=writer.id, endpoint=parent.endpoint,
                        completion_window=parent.completion_window, metadata=metadata, priority=parent.priority,
                        output_expires_after=None if parent.output_expires_after is None else
                        {"anchor": "created_at", "seconds": parent.output_expires_after})
