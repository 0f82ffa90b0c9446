"""Handlers for the worker-process tests, imported by the workers (from the tests folder)."""

from __future__ import annotations

import re

from threadserve import Connection


def hang_holding_the_gil(conn: Connection) -> None:
    """Echo lines; the line ``HANG`` wedges the whole process.

    A catastrophic regular expression runs in C without ever releasing the
    GIL, so no other thread of the process runs again (its heartbeat
    included): the worker is as stuck as a worker can be while still alive.
    """
    while line := conn.readline():
        if line.strip() == b"HANG":
            conn.sendall(b"hanging\n")
            re.match(r"(a+)+$", "a" * 64 + "b")
        conn.sendall(line)
