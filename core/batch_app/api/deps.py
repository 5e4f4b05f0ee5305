"""Shared request dependencies: settings, the database, and the caller's project."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import Depends, Request

from ..config import Settings
from ..database import Database
from ..domain.keys import DEFAULT_PROJECT, project_of
from .errors import APIError


def get_db(request: Request) -> Database:
    return request.app.state.db


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


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


def authenticate(request: Request, db: Annotated[Database, Depends(get_db)]) -> str:
    """The caller's project, from `Authorization: Bearer <key>`.

    With no key configured anywhere the server is open (bound to loopback by default) and every
    caller belongs to the default project.
    """
    key = _presented_key(request.headers.get("authorization", ""))
    with db.connect() as conn:
        project, any_keys = project_of(conn, key or None)
    if project is not None:
        return project
    if not any_keys:
        return DEFAULT_PROJECT
    if not key:
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                       code="missing_api_key")
    raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


DB = Annotated[Database, Depends(get_db)]
AppSettings = Annotated[Settings, Depends(get_settings)]
Project = Annotated[str, Depends(authenticate)]
