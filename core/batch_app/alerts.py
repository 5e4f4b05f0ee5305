"""Sentry: enabled when SENTRY_DSN is set; events carry worker, model and host tags."""

from __future__ import annotations

import logging
import socket

from . import __version__

log = logging.getLogger(__name__)
_enabled = False


def init_sentry(dsn: str, process_name: str, *, error_logs_as_events: bool = True) -> None:
    """Workers pass error_logs_as_events=False: the watchdog reports their failures, log tail included."""
    global _enabled
    if not dsn:
        return
    import sentry_sdk
    from sentry_sdk.integrations.logging import LoggingIntegration

    # Events only: the log lines themselves stay in the processes' log files, not in Sentry Logs.
    logging_integration = LoggingIntegration(level=None, event_level=logging.ERROR if error_logs_as_events else None)
    # Only the logging integration: the auto-enabled ones import every library they know of
    # (the openai SDK, huggingface_hub, ...) to patch it, seconds of CPU at each process start.
    sentry_sdk.init(dsn=dsn, release=f"vllm-batch-server@{__version__}", server_name=socket.gethostname(),
                    traces_sample_rate=0.0, integrations=[logging_integration], auto_enabling_integrations=False)
    from sentry_sdk.integrations.logging import ignore_logger_for_events

    sentry_sdk.set_tag("process", process_name)
    ignore_logger_for_events(__name__)  # alert() sends its own event; its log line must not make a second one
    _enabled = True


def alert(level: str, message: str, *, tags: dict[str, str], extra: dict | None = None) -> None:
    """Send one event ("warning" or "error"); the log line is written whether Sentry is on or not."""
    log.log(logging.ERROR if level == "error" else logging.WARNING, "%s", message)
    if not _enabled:
        return
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        scope.set_level(level)
        for key, value in tags.items():
            scope.set_tag(key, value)
        for key, value in (extra or {}).items():
            scope.set_extra(key, value)
        sentry_sdk.capture_message(message)


def flush() -> None:
    if _enabled:
        import sentry_sdk

        sentry_sdk.flush(timeout=5)
