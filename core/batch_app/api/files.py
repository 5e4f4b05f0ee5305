"""Files API: upload (streamed to the database in chunks), list, retrieve, download, delete."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from sqlalchemy import text

from ..domain.errors import NotFound
from ..domain.storage import delete_file, iter_chunks, store_stream
from .deps import DB, AppSettings, Project
from .errors import APIError

router = APIRouter(prefix="/v1/files", tags=["files"])


def file_object(row: Mapping) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": int(row["created_at"].timestamp()), "filename": row["filename"],
            "purpose": row["purpose"], "status": "processed", "expires_at": None, "status_details": None}


def _get_file_row(conn, project: str, file_id: str):
    row = conn.execute(text("SELECT * FROM files WHERE id = :id AND project = :project"),
                       {"id": file_id, "project": project}).mappings().first()
    if row is None:
        raise NotFound("file", file_id, "file_id")
    return row


@router.post("")
def upload_file(db: DB, settings: AppSettings, project: Project,
                file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> dict:
    if purpose != "batch":
        raise APIError(400, f"Unsupported purpose '{purpose}'; this server accepts 'batch'.",
                       param="purpose", code="invalid_value")
    filename = file.filename or "upload.jsonl"
    if not filename.endswith(".jsonl"):
        raise APIError(400, f"File '{filename}' must be a .jsonl file.", param="file", code="invalid_file_format")
    with db.begin() as conn:
        row = store_stream(conn, file.file, project=project, purpose=purpose, filename=filename,
                           max_bytes=settings.max_file_bytes)
    return file_object(row)


@router.get("")
def list_files(db: DB, project: Project, purpose: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, after: str | None = None,
               order: Literal["asc", "desc"] = "desc") -> dict:
    direction, compare = ("DESC", "<") if order == "desc" else ("ASC", ">")
    with db.connect() as conn:
        rows = conn.execute(text(f"""
            SELECT * FROM files
            WHERE project = :project AND (CAST(:purpose AS text) IS NULL OR purpose = :purpose)
              AND (CAST(:after AS text) IS NULL OR (created_at, id) {compare} (
                   SELECT created_at, id FROM files WHERE id = :after AND project = :project))
            ORDER BY created_at {direction}, id {direction} LIMIT :limit"""),
            {"project": project, "purpose": purpose, "after": after, "limit": limit + 1}).all()
    page = [file_object(row._mapping) for row in rows[:limit]]
    return {"object": "list", "data": page, "has_more": len(rows) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


@router.get("/{file_id}")
def retrieve_file(file_id: str, db: DB, project: Project) -> dict:
    with db.connect() as conn:
        return file_object(_get_file_row(conn, project, file_id))


@router.get("/{file_id}/content")
def download_file(file_id: str, db: DB, project: Project) -> StreamingResponse:
    with db.connect() as conn:
        row = _get_file_row(conn, project, file_id)
    return StreamingResponse(iter_chunks(db, file_id), media_type="application/jsonl",
                             headers={"Content-Length": str(row["bytes"]),
                                      "Content-Disposition": f'attachment; filename="{row["filename"]}"'})


@router.delete("/{file_id}")
def remove_file(file_id: str, db: DB, project: Project) -> dict:
    with db.begin() as conn:
        _get_file_row(conn, project, file_id)
        delete_file(conn, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
