"""The gateway's line protocol as the benchmark peers speak it (part of examples/pg_gateway.py).

``GET <id>`` answers the row of ``items`` as JSON, ``SLOW <seconds>`` runs
pg_sleep and answers ``OK slept <seconds>``. The peers need no more: the load
generator sends nothing else, and checks every reply.
"""

from __future__ import annotations

from dataclasses import dataclass

#: psycopg placeholders; asyncpg's are numbered ($1).
GET_SQL = "SELECT row_to_json(i)::text FROM items AS i WHERE i.id = %s"
SLOW_SQL = "SELECT pg_sleep(%s)"
GET_SQL_NUMBERED = GET_SQL.replace("%s", "$1")
SLOW_SQL_NUMBERED = SLOW_SQL.replace("%s", "$1")
NOT_FOUND = b"ERR not found\n"
BAD_REQUEST = b"ERR bad request\n"


@dataclass(frozen=True)
class Request:
    slow: bool  # SLOW rather than GET
    value: float  # the id, or the seconds
    text: bytes  # the argument as sent, echoed by SLOW's reply


def parse(line: bytes) -> Request | None:
    words = line.split()
    if len(words) != 2:
        return None
    verb, argument = words[0].upper(), words[1]
    try:
        if verb == b"GET" and argument.isdigit():
            return Request(False, int(argument), argument)
        if verb == b"SLOW":
            return Request(True, float(argument), argument)
    except ValueError:
        return None
    return None


def reply(request: Request, row: str | None) -> bytes:
    """The reply line, given what the query returned (a JSON row, or None)."""
    if request.slow:
        return b"OK slept " + request.text + b"\n"
    return NOT_FOUND if row is None else row.encode() + b"\n"
