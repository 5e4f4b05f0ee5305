"""File contents kept in the database in ordered chunks, so every host sees the same bytes.

Nothing here holds a whole file in memory: uploads are written chunk by chunk, and reads
stream one chunk at a time through a server-side cursor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import BinaryIO

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..database import Database
from .errors import TooLarge
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

    def close(self) -> dict:
        self._write_row()
        if self._buffer:
            self._flush(bytes(self._buffer))
            self._buffer.clear()
        row = self.conn.execute(
            files.update().where(files.c.id == self.id).values(bytes=self.size).returning(*files.c)
        ).mappings().one()
        return dict(row)


def store_stream(conn: Connection, stream: BinaryIO, *, project: str, purpose: str,
                 filename: str, max_bytes: int) -> dict:
    writer = FileWriter(conn, project=project, purpose=purpose, filename=filename, max_bytes=max_bytes)
    while data := stream.read(CHUNK_BYTES):
        writer.write(data)
    return writer.close()


def iter_chunks(db: Database, file_id: str) -> Iterator[bytes]:
    """Yield a file's bytes chunk by chunk, on a connection of its own (for streaming responses)."""
    with db.connect() as conn:
        result = conn.execute(
            sa.select(file_chunks.c.data).where(file_chunks.c.file_id == file_id)
            .order_by(file_chunks.c.seq).execution_options(stream_results=True, yield_per=1)
        )
        for (data,) in result:
            yield bytes(data)


def iter_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes, bool]]:
    """Split a byte stream into (1-based line number, line without newline, ended by newline)."""
    pending = b""
    number = 0
    for chunk in chunks:
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) != -1:
            number += 1
            yield number, pending[start:end], True
            start = end + 1
        pending = pending[start:]
    if pending:
        yield number + 1, pending, False


def delete_file(conn: Connection, file_id: str) -> None:
    conn.execute(files.delete().where(files.c.id == file_id))
