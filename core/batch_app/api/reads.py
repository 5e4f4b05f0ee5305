"""The API's hot reads on its event loop: the key of every request, retrieves and lists.

A blocking read on a worker thread waits for the GIL at each hop and each round trip while the
event loop and the other threads run, and SQLAlchemy spends several times psycopg's own CPU on a
statement. These reads are one statement each (`domain/query.py`), awaited on the loop on
asyncio connections of their own in autocommit: a read costs its round trip and little else.

The connections are kept here rather than in a pool library's background tasks so that an outage
behaves as everywhere else in the API: a read that cannot connect fails at once with the
database's error (a 503), and the first read after the database is back connects again.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import psycopg
from psycopg.rows import namedtuple_row

from ..domain.query import Query

T = TypeVar("T")


class Reads:
    def __init__(self, conninfo: str, connect_args: dict[str, Any], size: int):
        self.conninfo = conninfo
        self.connect_args = connect_args
        self._slots = asyncio.Semaphore(size)  # connections in use at once
        self._idle: list[psycopg.AsyncConnection] = []

    async def run(self, query: Query[T]) -> T:
        async with self._slots:
            rows = await self._rows(query)
        return query.result(rows)

    async def _rows(self, query: Query, reuse: bool = True) -> list:
        """Idle connections are not checked before use: when one turns out dead (a database
        restart closed it, and so every other idle one), they are all dropped and the read is
        tried once more on a new connection."""
        reused = reuse and bool(self._idle)
        conn = self._idle.pop() if reused else await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, row_factory=namedtuple_row, **self.connect_args)
        try:
            cursor = await conn.execute(query.sql, query.params)
            rows = await cursor.fetchall()
        except psycopg.OperationalError:
            await conn.close()
            if not reused:
                raise
            await self._close_idle()
            return await self._rows(query, reuse=False)
        except BaseException:  # cancelled or refused mid-statement: its state is unknown
            await conn.close()
            raise
        self._idle.append(conn)
        return rows

    async def _close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    async def close(self) -> None:
        await self._close_idle()
