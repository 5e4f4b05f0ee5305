"""File contents kept in the database in ordered chunks, so every host sees the same bytes.

Nothing here holds a whole file in memory: uploads are written chunk by chunk, and reads take
one chunk a statement, so a reader holds no cursor open between chunks: a slow download borrows
a pooled connection only while it fetches, and ingest reads its file on the connection that
writes the requests.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..config import Settings
from ..database import Database
from .errors import InvalidRequest, TooLarge
from .ids import new_id
from .tables import file_chunks, files

CHUNK_BYTES = 4 * 1024 * 1024


class FileTooLarge(TooLarge):
    def __init__(self, limit: int):
        super().__init__(f"File exceeds the maximum size of {limit} bytes.", param="file", code="file_too_large")
        self.limit = limit


class FileWriter:
    """Appends bytes to a new file in chunks; the file row is written on `close`."""

    def __init__(self, conn: Connection, *, project: str, purpose: str, filename: str,
                 max_bytes: int | None = None):
        self.conn = conn
        self.id = new_id("file-")
        self.project, self.purpose, self.filename = project, purpose, filename
        self.max_bytes = max_bytes
        self.size = 0
        self._seq = 0
        self._buffer = bytearray()
        self._row_written = False

    def _write_row(self) -> None:
        # The file row precedes its chunks (foreign key); its size is set on close.
        if not self._row_written:
            self.conn.execute(files.insert().values(id=self.id, project=self.project, purpose=self.purpose,
                                                    filename=self.filename, bytes=0))
            self._row_written = True

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise FileTooLarge(self.max_bytes)
        self._buffer += data
        while len(self._buffer) >= CHUNK_BYTES:
            self._flush(bytes(self._buffer[:CHUNK_BYTES]))
            del self._buffer[:CHUNK_BYTES]

    def _flush(self, chunk: bytes) -> None:
        self._write_row()
        self.conn.execute(file_chunks.insert().values(file_id=self.id, seq=self._seq, data=chunk))
        self._seq += 1

    def close(self, expires_in: int | None = None) -> dict:
        """Write what is left and the file's size; `expires_in` seconds from its creation it expires."""
        self._write_row()
        if self._buffer:
            self._flush(bytes(self._buffer))
            self._buffer.clear()
        expires_at = None if expires_in is None else files.c.created_at + sa.func.make_interval(0, 0, 0, 0, 0, 0,
                                                                                                  expires_in)
        row = self.conn.execute(
            files.update().where(files.c.id == self.id).values(bytes=self.size, expires_at=expires_at)
            .returning(*files.c)
        ).mappings().one()
        return dict(row)


_CHUNK = sa.select(file_chunks.c.data).where(file_chunks.c.file_id == sa.bindparam("file_id"),
                                             file_chunks.c.seq == sa.bindparam("seq"))


def read_chunks(conn: Connection, file_id: str) -> Iterator[bytes]:
    """A file's bytes chunk by chunk, one statement each, on the caller's connection."""
    for seq in itertools.count():
        data = conn.execute(_CHUNK, {"file_id": file_id, "seq": seq}).scalar()
        if data is None:
            return
        yield bytes(data)


def iter_chunks(db: Database, file_id: str) -> Iterator[bytes]:
    """A file's bytes chunk by chunk, each fetched on a pooled connection given back at once
    (for streaming responses, which last as long as the client takes)."""
    for seq in itertools.count():
        with db.connect() as conn:
            data = conn.execute(_CHUNK, {"file_id": file_id, "seq": seq}).scalar()
        if data is None:
            return
        yield bytes(data)


@dataclass(frozen=True)
class Line:
    number: int  # 1-based
    data: bytes  # without its newline; only the first `max_bytes + 1` bytes of a longer line
    ended: bool  # by a newline (the last line of a file may not be)
    length: int  # its real length in bytes


def iter_lines(chunks: Iterable[bytes], max_bytes: int) -> Iterator[Line]:
    """Split a byte stream into lines. A line longer than `max_bytes` is kept only in part, so a
    file without newlines costs no more memory than one line at the limit, and no quadratic
    re-scan."""
    pending, dropped, number = bytearray(), 0, 0
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            number += 1
            length = len(pending) + dropped + end - start
            if pending or dropped:
                pending += chunk[start:min(end, start + max_bytes + 1 - len(pending))]
                yield Line(number, bytes(pending), True, length)
                pending.clear()
                dropped = 0
            else:
                yield Line(number, chunk[start:min(end, start + max_bytes + 1)], True, length)
            start = end + 1
        room = max(0, max_bytes + 1 - len(pending))
        pending += chunk[start:start + room]
        dropped += max(0, len(chunk) - start - room)
    if pending or dropped:
        yield Line(number + 1, bytes(pending), False, len(pending) + dropped)


def page_of_lines(chunks: Iterable[bytes], after: int, limit: int, max_bytes: int) -> tuple[bytes, int]:
    """The lines of a byte stream after the first `after`: at most `limit` of them and, but for a
    first line longer than that, at most `max_bytes`. Returns them and how many they are."""
    page, count, skipped = bytearray(), 0, 0
    line_start = 0  # where in `page` the line being read begins
    for chunk in chunks:
        start = 0
        if skipped < after:
            if skipped + chunk.count(b"\n") < after:
                skipped += chunk.count(b"\n")
                continue
            while skipped < after:
                start = chunk.index(b"\n", start) + 1
                skipped += 1
        while (end := chunk.find(b"\n", start)) != -1:
            page += chunk[start:end + 1]
            start = end + 1
            if count and len(page) > max_bytes:
                return bytes(page[:line_start]), count
            count += 1
            line_start = len(page)
            if count == limit:
                return bytes(page), count
        page += chunk[start:]
        if count and len(page) > max_bytes:
            break
    return bytes(page[:line_start]), count


def delete_file(conn: Connection, file_id: str) -> None:
    conn.execute(files.delete().where(files.c.id == file_id))


# A file past its `expires_at` is gone for its owner at once (every read of files says so) and
# its row and contents are deleted by housekeeping; a batch made from it keeps its own record.
LIVE_FILE = "(expires_at IS NULL OR expires_at > now())"

_DELETE_EXPIRED = sa.text("DELETE FROM files WHERE expires_at <= now() RETURNING id")


def delete_expired(conn: Connection) -> list[str]:
    return list(conn.execute(_DELETE_EXPIRED).scalars())


def expiry_seconds(policy, settings: Settings, param: str) -> int | None:
    """Seconds after creation that a file expires, from OpenAI's `{"anchor": "created_at",
    "seconds": N}` (N within MIN_FILE_EXPIRY and MAX_FILE_EXPIRY); without a policy, FILE_RETENTION."""
    if policy is None:
        return settings.file_retention
    if not isinstance(policy, dict) or policy.get("anchor") != "created_at":
        raise InvalidRequest(f"{param}.anchor must be 'created_at'.", param=f"{param}.anchor", code="invalid_value")
    seconds = policy.get("seconds")
    if isinstance(seconds, str) and seconds.isascii() and seconds.isdigit() and len(seconds) <= 12:
        seconds = int(seconds)  # a multipart form sends it as text (`isdigit` alone takes "²")
    if (not isinstance(seconds, int) or isinstance(seconds, bool)
            or not settings.min_file_expiry <= seconds <= settings.max_file_expiry):
        raise InvalidRequest(f"{param}.seconds must be an integer from {settings.min_file_expiry} to "
                             f"{settings.max_file_expiry}.", param=f"{param}.seconds", code="invalid_value")
    return seconds
