"""A `multipart/form-data` upload parsed as it arrives and written straight into the database.

Nothing is spooled to disk or held whole: the file part goes to the database chunk by chunk in
the request's transaction, and reading stops the moment it passes MAX_FILE_BYTES (chunked bodies
too), so no more than the limit is written anywhere and a refused upload leaves nothing behind.
The route runs only after its key was checked, so an unauthenticated body is never read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio.from_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from ..domain.errors import InvalidRequest, TooLarge
from ..domain.storage import FileWriter

# Form fields other than the file are few and small (`purpose`); more or longer ones are refused.
MAX_FIELD_BYTES = 1024
MAX_FIELDS = 16
# Room for the multipart envelope and the small fields around the file itself.
ENVELOPE_BYTES = 64 * 1024


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    value: bytearray = field(default_factory=bytearray)


class MultipartUpload:
    """Feeds a request body through the parser; the file part into `writer` once it is named."""

    def __init__(self, request: Request, open_writer, max_file_bytes: int):
        content_type, options = parse_options_header(request.headers.get("content-type", ""))
        boundary = options.get(b"boundary")
        if content_type != b"multipart/form-data" or not boundary:
            raise InvalidRequest("Upload the file as multipart/form-data with fields 'file' and 'purpose'.",
                                 param="file", code="invalid_request")
        self._request = request
        self._max_body = max_file_bytes + ENVELOPE_BYTES  # a body without Content-Length is cut off here
        self._open_writer = open_writer  # filename -> FileWriter, called once the file part's name is known
        self.fields: dict[str, str] = {}
        self.writer: FileWriter | None = None
        self._part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end})

    def read(self) -> None:
        """Read the whole body (from a worker thread: the body arrives on the event loop)."""
        try:
            for chunk in self._chunks():
                self._parser.write(chunk)
            self._parser.finalize()
        except FormParserError as exc:
            raise InvalidRequest(f"The upload is not well-formed multipart/form-data: {exc}", param="file",
                                 code="invalid_request") from exc

    def _chunks(self) -> Iterator[bytes]:
        stream = self._request.stream()
        read = 0
        while True:
            try:
                chunk = anyio.from_thread.run(_next_or_none, stream)
            except ClientDisconnect as exc:
                raise InvalidRequest("The upload ended before its body did.", param="file",
                                     code="incomplete_upload") from exc
            if chunk is None:
                return
            read += len(chunk)
            if read > self._max_body:
                raise TooLarge(f"The upload exceeds the maximum size of {self._max_body - ENVELOPE_BYTES} bytes.",
                               param="file", code="file_too_large")
            if chunk:
                yield chunk

    # --- parser callbacks ---

    def _part_begin(self) -> None:
        if len(self.fields) >= MAX_FIELDS:
            raise InvalidRequest(f"The upload has more than {MAX_FIELDS} form fields.", param="file",
                                 code="invalid_request")
        self._part, self._headers = _Part(), {}

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options and self._part.name == "file":
            if self.writer is not None:
                raise InvalidRequest("Upload one file at a time.", param="file", code="invalid_request")
            self._part.filename = options[b"filename"].decode("utf-8", "replace")
            self.writer = self._open_writer(self._part.filename)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part.filename is not None:
            self.writer.write(data[start:end])  # raises FileTooLarge past the limit
            return
        self._part.value += data[start:end]
        if len(self._part.value) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"Form field '{self._part.name[:40]}' is longer than {MAX_FIELD_BYTES} bytes.",
                                 param=self._part.name[:40] or None, code="invalid_value")

    def _part_end(self) -> None:
        if self._part.filename is None and self._part.name:
            self.fields[self._part.name] = self._part.value.decode("utf-8", "replace")


async def _next_or_none(stream) -> bytes | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
