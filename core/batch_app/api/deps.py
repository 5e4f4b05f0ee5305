"""Shared request dependencies: settings, the database, and the caller's project."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import Depends, Request

from ..config import Settings
from ..database import Database
from ..domain.keys import DEFAULT_PROJECT, project_of
from .errors import APIError
from .reads import Reads


# Dependencies are coroutines even where they do not wait: FastAPI runs a plain function
# dependency on a worker thread, a thread hop per request for an attribute read.
async def get_db(request: Request) -> Database:
    return request.app.state.db


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_reads(request: Request) -> Reads:
    return request.app.state.reads


def _presented_key(header: str) -> str:
    """The key from `Bearer <key>`, or from `Basic` credentials whose password is the key (browsers)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return ""
    return ""


async def authenticate(request: Request, reads: Annotated[Reads, Depends(get_reads)]) -> str:
    """The caller's project, from `Authorization: Bearer <key>`, looked up on every request (a
    revoked key is refused at once, and for good).

    Only OPEN_ACCESS opens the server: a caller without a live key then belongs to the default
    project. Without it a live key is always required, however many keys exist (none included).
    """
    key = _presented_key(request.headers.get("authorization", ""))
    project, revoked = await reads.run(project_of(key)) if key else (None, False)
    if project is not None and not revoked:
        return project
    if request.app.state.settings.open_access:
        return DEFAULT_PROJECT
    if not key:
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                       code="missing_api_key")
    if revoked:
        raise APIError(401, "This API key was revoked.", code="invalid_api_key")
    raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


DB = Annotated[Database, Depends(get_db)]
DBReads = Annotated[Reads, Depends(get_reads)]
AppSettings = Annotated[Settings, Depends(get_settings)]
Project = Annotated[str, Depends(authenticate)]
