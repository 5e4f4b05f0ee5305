"""A scratch embedded PostgreSQL for a benchmark: migrated, and stopped and removed afterwards."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from core.batch_app.config import Settings
from core.batch_app.database import Database, database_url, migrate, open_database, stop_embedded


@contextlib.contextmanager
def scratch_database(prefix: str, pool_size: int = 1) -> Iterator[tuple[Path, str, Database]]:
    """(its DATA_DIR, its URL, a pool of `pool_size` connections to it); DATA_DIR's parent is
    the bench's own scratch folder."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", database_url="")
        url = database_url(settings)
        migrate(url)
        db = open_database(url, pool_size=pool_size)
        try:
            yield settings.data_dir, url, db
        finally:
            db.dispose()
            stop_embedded(settings)
