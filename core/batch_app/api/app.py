"""The FastAPI application: routers, error shapes, and the upload size guard."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request

from .. import __version__
from ..config import Settings
from ..database import Database
from . import batches, files, metrics, status_page, system
from .batch_endings import BatchEndings
from .database_probe import DatabaseProbe
from .errors import error_response, install_error_handlers

log = logging.getLogger(__name__)

# Room for the multipart envelope around the file itself.
_MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: Settings, db: Database) -> FastAPI:
    batch_endings = BatchEndings(db)
    database_probe = DatabaseProbe(db)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await database_probe.start()
        yield
        await database_probe.close()
        await batch_endings.close()

    app = FastAPI(title="vLLM Batch Server", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.db = db
    app.state.batch_endings = batch_endings
    app.state.database_probe = database_probe
    app.state.metrics_registry = metrics.metrics_registry(db)
    install_error_handlers(app)

    @app.middleware("http")
    async def refuse_oversize_uploads(request: Request, call_next):
        # Refuse before the multipart body is read at all, from the declared length.
        length = request.headers.get("content-length")
        if (request.method == "POST" and request.url.path == "/v1/files" and length and length.isdigit()
                and int(length) > settings.max_file_bytes + _MULTIPART_OVERHEAD):
            return error_response(413, f"File exceeds the maximum size of {settings.max_file_bytes} bytes.",
                                  "invalid_request_error", "file", "file_too_large")
        return await call_next(request)

    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(system.router)
    app.include_router(metrics.router)
    app.include_router(status_page.router)
    return app
