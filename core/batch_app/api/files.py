"""Files API: upload (streamed to the database in chunks), list, retrieve, download, delete."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import text

from ..domain import limits
from ..domain.errors import InvalidRequest, NotFound, TooLarge
from ..domain.storage import LIVE_FILE, FileWriter, delete_file, expiry_seconds, iter_chunks
from .deps import DB, AppSettings, Project
from .errors import documented
from .uploads import ENVELOPE_BYTES, MultipartUpload

router = APIRouter(prefix="/v1/files", tags=["files"])


def file_object(row: Mapping) -> dict:
    expires_at = row["expires_at"]
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": int(row["created_at"].timestamp()), "filename": row["filename"],
            "purpose": row["purpose"], "status": "processed", "status_details": None,
            "expires_at": int(expires_at.timestamp()) if expires_at is not None else None}


def _get_file_row(conn, project: str, file_id: str):
    row = conn.execute(text(f"SELECT * FROM files WHERE id = :id AND project = :project AND {LIVE_FILE}"),
                       {"id": file_id, "project": project}).mappings().first()
    if row is None:
        raise NotFound("file", file_id, "file_id")
    return row


# The upload is parsed by hand (uploads.py), so its form is described here for OpenAPI clients.
_UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]},
                   "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                   "expires_after[seconds]": {"type": "integer"}},
}}}}}


# Where a new file's id is used next, for OpenAPI clients (and schemathesis' stateful phase).
_FILE_LINKS = {200: {"description": "The new file", "links": {
    operation: {"operationId": operation, "parameters": {"file_id": "$response.body#/id"}}
    for operation in ("retrieveFile", "downloadFile", "deleteFile")}}}


@router.post("", responses={**_FILE_LINKS, **documented(400, 401, 413, 429, 503)}, openapi_extra=_UPLOAD_FORM,
             operation_id="createFile")
def upload_file(request: Request, db: DB, settings: AppSettings, project: Project) -> dict:
    """Multipart fields `file` (a .jsonl file), `purpose` ("batch") and optionally
    `expires_after[anchor]` ("created_at") and `expires_after[seconds]`, read only once the key
    is known good, and written to the database as they arrive (see uploads.py)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > settings.max_file_bytes + ENVELOPE_BYTES:
        raise TooLarge(f"File exceeds the maximum size of {settings.max_file_bytes} bytes.", param="file",
                       code="file_too_large")
    # An upload holds a connection while its body arrives: slow uploads wait here, holding
    # none, rather than take every connection the other requests need.
    with request.app.state.upload_slots, db.begin() as conn:
        limits.check_files(conn, settings, project, written=False)  # refused before its body is read

        def open_writer(filename: str) -> FileWriter:
            if not filename.endswith(".jsonl"):
                raise InvalidRequest(f"File '{filename[:200]}' must be a .jsonl file.", param="file",
                                     code="invalid_file_format")
            return FileWriter(conn, project=project, purpose="batch", filename=filename,
                              max_bytes=settings.max_file_bytes)

        upload = MultipartUpload(request, open_writer, settings.max_file_bytes)
        upload.read()
        purpose = upload.fields.get("purpose")
        if purpose != "batch":
            raise InvalidRequest(f"Unsupported purpose '{(purpose or '')[:40]}'; this server accepts 'batch'."
                                 if purpose is not None else "The form field 'purpose' is required.",
                                 param="purpose", code="invalid_value" if purpose is not None
                                 else "missing_required_parameter")
        if upload.writer is None:
            raise InvalidRequest("The form field 'file' is required.", param="file",
                                 code="missing_required_parameter")
        policy = {name: upload.fields[f"expires_after[{name}]"] for name in ("anchor", "seconds")
                  if f"expires_after[{name}]" in upload.fields}
        row = upload.writer.close(expiry_seconds(policy or None, settings, "expires_after"))
        limits.check_files(conn, settings, project, written=True)
    return file_object(row)


@router.get("", responses=documented(400, 401, 503), operation_id="listFiles")
def list_files(db: DB, project: Project, purpose: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, after: str | None = None,
               order: Literal["asc", "desc"] = "desc") -> dict:
    direction, compare = ("DESC", "<") if order == "desc" else ("ASC", ">")
    with db.connect() as conn:
        rows = conn.execute(text(f"""
            SELECT * FROM files
            WHERE project = :project AND (CAST(:purpose AS text) IS NULL OR purpose = :purpose) AND {LIVE_FILE}
              AND (CAST(:after AS text) IS NULL OR (created_at, id) {compare} (
                   SELECT created_at, id FROM files WHERE id = :after AND project = :project))
            ORDER BY created_at {direction}, id {direction} LIMIT :limit"""),
            {"project": project, "purpose": purpose, "after": after, "limit": limit + 1}).all()
    page = [file_object(row._mapping) for row in rows[:limit]]
    return {"object": "list", "data": page, "has_more": len(rows) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


@router.get("/{file_id}", responses=documented(400, 401, 404, 503), operation_id="retrieveFile")
def retrieve_file(file_id: str, db: DB, project: Project) -> dict:
    with db.connect() as conn:
        return file_object(_get_file_row(conn, project, file_id))


@router.get("/{file_id}/content", responses={
    200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}, "description": "The file's bytes"},
    **documented(400, 401, 404, 503)}, response_class=StreamingResponse, operation_id="downloadFile")
def download_file(file_id: str, db: DB, project: Project) -> StreamingResponse:
    with db.connect() as conn:
        row = _get_file_row(conn, project, file_id)
    return StreamingResponse(iter_chunks(db, file_id), media_type="application/jsonl",
                             headers={"Content-Length": str(row["bytes"]),
                                      "Content-Disposition": content_disposition(row["filename"])})


def content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII fallback for old clients, and the name itself as UTF-8 in `filename*`."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.delete("/{file_id}", responses=documented(400, 401, 404, 503), operation_id="deleteFile")
def remove_file(file_id: str, db: DB, project: Project) -> dict:
    with db.begin() as conn:
        _get_file_row(conn, project, file_id)
        delete_file(conn, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
