"""Retrieves held until a batch ends, answered the moment it does rather than at the next poll.

One connection per API process LISTENs on queue.BATCH_ENDED_CHANNEL and wakes the requests
waiting on that batch. Notifications only shorten a wait: a waiter re-reads its batch every
RECHECK seconds anyway, so a lost one costs seconds, never a wrong answer. Behind a pooler in
transaction mode (where a LISTEN is lost with its server connection) nothing listens: re-reads only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import psycopg

from ..database import Database
from ..domain.queue import BATCH_ENDED_CHANNEL
from ..outage import describe, is_unreachable, outage

log = logging.getLogger(__name__)

# Seconds between re-reads of a waited-on batch, and between attempts to listen again.
RECHECK = 5.0


class BatchEndings:
    def __init__(self, db: Database, listen: bool = True, application_name: str = "api_server listener"):
        self.listen, self.application_name = listen, application_name
        self._conninfo = db.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task | None = None

    @contextlib.contextmanager
    def watch(self, batch_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever `batch_id` may have ended; watch before reading it, so an ending
        between the read and the wait still wakes the waiter."""
        if self._listener is None and self.listen:
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        event = asyncio.Event()
        self._waiters.setdefault(batch_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters[batch_id]
            waiters.discard(event)
            if not waiters:
                del self._waiters[batch_id]

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True,
                                                                application_name=self.application_name) as conn:
                    await conn.execute(f"LISTEN {BATCH_ENDED_CHANNEL}")
                    self._wake(list(self._waiters))  # whatever changed before listening went unheard
                    async for notify in conn.notifies():
                        self._wake([notify.payload])
            except Exception as exc:
                if is_unreachable(exc):  # logged once for the whole outage
                    outage.failed(exc, "listening for batch endings")
                else:
                    log.warning("cannot listen for batch endings (%s); held retrieves re-read every %.0f s",
                                describe(exc), RECHECK)
                await asyncio.sleep(RECHECK)

    def _wake(self, batch_ids: list[str]) -> None:
        for batch_id in batch_ids:
            for event in self._waiters.get(batch_id, ()):
                event.set()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
