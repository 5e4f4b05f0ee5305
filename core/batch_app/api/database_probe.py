"""The API's view of the database, refreshed in the background: `/health` (the liveness probe)
answers from it at once, never waiting on the database; `/ready` asks the database itself.
The probe is also what logs the end of an outage for the API process."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import text

from ..database import Database
from ..outage import is_unreachable, outage

# Seconds between checks.
INTERVAL = 2.0


class DatabaseProbe:
    def __init__(self, db: Database):
        self.db = db
        self.state = "unknown"  # "connected", or "unreachable: <error type>"
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """The first check before the API serves, then one every INTERVAL in the background."""
        self.state = await run_in_threadpool(self.check)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            self.state = await run_in_threadpool(self.check)

    def check(self) -> str:
        """Ask the database now (blocking: call it off the event loop)."""
        try:
            with self.db.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # any failure means "not reachable" to a probe
            if is_unreachable(exc):
                outage.failed(exc, "checking the database")
            return f"unreachable: {type(exc).__name__}"
        outage.reached()
        return "connected"

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
