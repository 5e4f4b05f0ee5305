"""The FastAPI application: routers, error shapes, and the upload size guard."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI

from .. import __version__
from ..config import Settings
from ..database import Database
from . import batches, files, metrics, status_page, system
from .batch_endings import BatchEndings
from .database_probe import DatabaseProbe
from .errors import RefuseNulBytes, install_error_handlers

log = logging.getLogger(__name__)

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
    app.add_middleware(RefuseNulBytes)

    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(system.router)
    app.include_router(metrics.router)
    app.include_router(status_page.router)
    return app
