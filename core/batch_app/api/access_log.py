"""One line per request worth an operator's reading, written by an ASGI middleware.

By default (`API_ACCESS_LOG=changes`) the requests that change something (every method but GET
and HEAD) and every answer that is not a success are logged, and successful reads are not:
clients polling their batches would otherwise write most of the log, and writing a line costs
about as much CPU as answering a retrieve. `all` logs every request, `none` nothing.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

_READS = frozenset({"GET", "HEAD"})


class AccessLog:
    def __init__(self, app, mode: str):
        self.app = app
        self.mode = mode

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.mode == "none":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when an error escapes before an answer starts

        async def send_noting_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            if self.mode == "all" or scope["method"] not in _READS or status >= 400:
                client = scope.get("client")
                path = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
                log.info('%s - "%s %s HTTP/%s" %d %.1f ms', f"{client[0]}:{client[1]}" if client else "-",
                         scope["method"], path, scope.get("http_version", "1.1"), status,
                         (time.perf_counter() - started) * 1000)
