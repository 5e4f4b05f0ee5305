"""The FastAPI application: routers, error shapes, and the upload size guard."""

from __future__ import annotations

import contextlib
import logging
import threading

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .. import __version__
from ..config import Settings
from ..database import Database
from . import batches, files, metrics, status_page, system, webhooks
from .access_log import AccessLog
from .batch_endings import BatchEndings
from .database_probe import DatabaseProbe
from .errors import RefuseNulBytes, install_error_handlers
from .reads import Reads

log = logging.getLogger(__name__)

def create_app(settings: Settings, db: Database, reads: Reads) -> FastAPI:
    batch_endings = BatchEndings(db, listen=not settings.database_transaction_pooling,
                                 application_name=f"api_server listener@{settings.host_name}")
    database_probe = DatabaseProbe(db)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await database_probe.start()
        yield
        await database_probe.close()
        await batch_endings.close()
        await reads.close()

    app = FastAPI(title="vLLM Batch Server", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.db = db
    app.state.reads = reads
    app.state.batch_endings = batch_endings
    app.state.database_probe = database_probe
    app.state.upload_slots = threading.BoundedSemaphore(max(1, settings.api_database_pool // 2))
    app.state.metrics_registry = metrics.metrics_registry(db)
    install_error_handlers(app)
    app.add_middleware(RefuseNulBytes)
    app.add_middleware(AccessLog, mode=settings.api_access_log)

    app.openapi = lambda: _without_422(app)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(webhooks.router)
    app.include_router(system.router)
    app.include_router(metrics.router)
    app.include_router(status_page.router)
    return app


def _without_422(app: FastAPI) -> dict:
    """The OpenAPI document without FastAPI's 422 responses: a request that fails validation
    gets a 400 in OpenAI's shape here (errors.py), which every route documents instead."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
            operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
