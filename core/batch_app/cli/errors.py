"""Every failure of a command is one clear line on stderr and exit code 1, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import sqlalchemy.exc

if TYPE_CHECKING:
    import openai


class CommandError(Exception):
    """A failure with a message written for the person at the terminal."""


def describe(exc: BaseException, api_url: str) -> str:
    if isinstance(exc, CommandError):
        return str(exc)
    # Only the user's commands load the SDK (an operator's would take seconds longer), and only they raise its errors.
    sdk = sys.modules.get("openai")
    if sdk is not None:
        if isinstance(exc, sdk.APIConnectionError):
            return f"cannot reach the API at {api_url}: is the server running? (scripts/start-all.sh)"
        if isinstance(exc, sdk.AuthenticationError):
            return f"the API refused the key: {_api_message(exc)} (set BATCHCTL_API_KEY or pass --api-key)"
        if isinstance(exc, sdk.APIStatusError):
            return f"the API answered {exc.status_code}: {_api_message(exc)}"
    if isinstance(exc, sqlalchemy.exc.OperationalError):
        return f"cannot reach the database: {str(exc.orig or exc).strip().splitlines()[0]}"
    if isinstance(exc, sqlalchemy.exc.ProgrammingError):
        return f"the database has no schema yet (start the API once to migrate it): {str(exc.orig).splitlines()[0]}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    return f"{type(exc).__name__}: {exc}"


def _api_message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    return (error.get("message") if isinstance(error, dict) else None) or exc.message


def run_reporting_errors(command: Callable[[], None], api_url: Callable[[], str]) -> None:
    try:
        command()
    except KeyboardInterrupt:
        print("batchctl: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # the whole point: any failure becomes one line
        print(f"batchctl: {describe(exc, api_url())}", file=sys.stderr)
        sys.exit(1)
