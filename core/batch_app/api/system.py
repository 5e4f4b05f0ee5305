"""Models list, health and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from .. import __version__
from ..domain.registry import served_models
from .deps import DB, AppSettings, Project
from .errors import documented, error_response

router = APIRouter()


@router.get("/v1/models", tags=["models"], responses=documented(400, 401, 503))
def list_models(db: DB, settings: AppSettings, project: Project) -> dict:
    with db.connect() as conn:
        return {"object": "list", "data": served_models(conn, settings.heartbeat_timeout)}


@router.get("/health", tags=["system"])
async def health(request: Request) -> dict:
    """Liveness: the process answers; the database state (checked every few seconds in the
    background) is reported, not required, and never waited for."""
    return {"status": "healthy", "service": "batch-api", "version": __version__,
            "database": request.app.state.database_probe.state}


@router.get("/ready", tags=["system"], responses=documented(503))
async def ready(request: Request) -> JSONResponse:
    """Readiness: the database answers now."""
    state = await run_in_threadpool(request.app.state.database_probe.check)
    if state != "connected":
        return error_response(503, f"Database {state}.", "service_unavailable_error", None, "database_unavailable")
    return JSONResponse({"status": "ready", "database": state})
