"""Models list, health and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from .. import __version__
from ..domain.registry import served_models
from .deps import DB, AppSettings, Project
from .errors import error_response

router = APIRouter()


@router.get("/v1/models", tags=["models"])
def list_models(db: DB, settings: AppSettings, project: Project) -> dict:
    with db.connect() as conn:
        return {"object": "list", "data": served_models(conn, settings.heartbeat_timeout)}


def _database_state(db) -> str:
    try:
        with db.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "connected"
    except Exception as exc:  # any failure means "not reachable" to a health probe
        return f"unreachable: {type(exc).__name__}"


@router.get("/health", tags=["system"])
def health(db: DB) -> dict:
    """Liveness: the process answers; the database state is reported, not required."""
    return {"status": "healthy", "service": "batch-api", "version": __version__,
            "database": _database_state(db)}


@router.get("/ready", tags=["system"])
def ready(db: DB) -> JSONResponse:
    state = _database_state(db)
    if state != "connected":
        return error_response(503, f"Database {state}.", "service_unavailable_error", None, "database_unavailable")
    return JSONResponse({"status": "ready", "database": state})
