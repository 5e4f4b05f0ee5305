"""Every error leaves the API in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..domain.errors import Conflict, DomainError, Gone, InvalidRequest, LimitReached, NoLiveWorker, NotFound, TooLarge
from ..outage import describe, is_unreachable, outage

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    410: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",  # OpenAI's type for a limit reached
    503: "service_unavailable_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, the only shape an error leaves this API in."""

    error: ErrorDetail


_MEANINGS = {
    400: "Invalid request: the message names the parameter (`param`)",
    401: "Missing or incorrect API key",
    404: "No such object in the caller's project, or no such URL",
    409: "The object's state does not allow this",
    410: "What was asked for existed but was deleted or has expired",
    413: "The upload is larger than MAX_FILE_BYTES",
    429: "The project is at one of its limits (the message and `code` name it)",
    503: "The database is unreachable, or no live worker serves the model",
}


def documented(*statuses: int) -> dict[int, dict]:
    """OpenAPI `responses` for a route: these statuses, each with the error body's schema. Every
    route that reads the database can answer 503, and every one behind a key 401 and 400."""
    return {status: {"model": ErrorResponse, "description": _MEANINGS[status]} for status in statuses}


class APIError(Exception):
    def __init__(self, status_code: int, message: str, *, param: str | None = None,
                 code: str | None = None, error_type: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPES.get(status_code, "api_error")


# The HTTP status of each kind of domain error.
_DOMAIN_STATUS = {InvalidRequest: 400, NotFound: 404, Conflict: 409, Gone: 410, TooLarge: 413, LimitReached: 429,
                  NoLiveWorker: 503}


def error_response(status_code: int, message: str, error_type: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status_code,
        content={"error": {"message": message, "type": error_type, "param": param, "code": code}},
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.error_type, exc.param, exc.code)

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> JSONResponse:
        status_code = next(code for kind, code in _DOMAIN_STATUS.items() if isinstance(exc, kind))
        return error_response(status_code, exc.message, _TYPES[status_code], exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(location) or None
        message = f"Invalid value for '{param}': {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, message, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
            return error_response(404, message, "invalid_request_error", None, "unknown_url")
        return error_response(exc.status_code, str(exc.detail),
                              _TYPES.get(exc.status_code, "api_error"), None, None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        if is_unreachable(exc):  # the database is down or restarting: a clear 503, logged once
            outage.failed(exc, "answering requests")
            return error_response(503, f"The database is unreachable ({describe(exc)}); try again shortly.",
                                  "service_unavailable_error", None, "database_unavailable")
        log.exception("unhandled error: %s: %s", type(exc).__name__, exc)
        return error_response(500, f"Internal server error ({type(exc).__name__}).", "server_error")


class RefuseNulBytes:
    """ASGI middleware: a NUL byte in the path or a query parameter is a 400 for every route at
    once. PostgreSQL text cannot hold one, so it would otherwise surface as a 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            query = scope.get("query_string", b"").decode("latin-1")
            if "\x00" in scope["path"] or "%00" in query:
                names = [name for name, value in parse_qsl(query, keep_blank_values=True)
                         if "\x00" in name or "\x00" in value]
                param = names[0][:80].replace("\x00", "") if names else None
                where = f"query parameter '{param}'" if names else "the URL path"
                await error_response(400, f"The {where} contains a NUL byte.", "invalid_request_error", param,
                                     "invalid_value")(scope, receive, send)
                return
        await self.app(scope, receive, send)
