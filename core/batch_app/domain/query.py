"""A read of one statement, run on the API's event loop (`api/reads.py`) or on any SQLAlchemy
connection (`run`): its SQL once, with psycopg's `%(name)s` parameters, and what its rows become."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from sqlalchemy.engine import Connection

T = TypeVar("T")


@dataclass(frozen=True)
class Query(Generic[T]):
    sql: str
    params: dict[str, Any]
    result: Callable[[list], T]  # the rows (each with its columns as attributes) -> the answer


def run(conn: Connection, query: Query[T]) -> T:
    return query.result(conn.exec_driver_sql(query.sql, query.params).all())
