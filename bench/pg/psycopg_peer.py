"""What the blocking peers share: a psycopg pool, filled before serving; a query per request."""

from __future__ import annotations

from typing import Any

import psycopg_pool

from .protocol import BAD_REQUEST, GET_SQL, SLOW_SQL, parse, reply


def open_pool(dsn: str, size: int, name: str) -> psycopg_pool.ConnectionPool[Any]:
    """A pool of exactly ``size`` connections, all open before it returns."""
    pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
        dsn,
        min_size=size,
        max_size=size,
        kwargs={"autocommit": True, "application_name": name},
        open=False,
        timeout=60,
    )
    pool.open(wait=True, timeout=300)
    return pool


def answer(pool: psycopg_pool.ConnectionPool[Any], line: bytes) -> bytes:
    """One request line in, one reply line out; blocks for the query."""
    request = parse(line)
    if request is None:
        return BAD_REQUEST
    with pool.connection() as pg:
        sql = SLOW_SQL if request.slow else GET_SQL
        param = request.value if request.slow else int(request.value)
        row = pg.execute(sql, (param,)).fetchone()
    return reply(request, None if request.slow or row is None else str(row[0]))
