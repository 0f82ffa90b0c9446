"""Handlers for a server run as a user runs it: ``threadserve serve subprocess_handlers:NAME``.

The server process imports this module from the tests folder (on its
PYTHONPATH or as its current directory), so it imports nothing from the test
suite. The protocols are line-based so that how TCP happens to split the
bytes never changes what a client sees.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from threadserve import Connection

#: Acknowledges that a held or stuck line has been read, so a test knows it is
#: read and not yet answered, without guessing with a sleep.
READ_ACK = b"+"

#: Not callable: a handler spec naming it must be refused.
NOT_A_HANDLER = "a string"


def hold_until_stop(conn: Connection) -> None:
    """Echo lines; a line starting with H is acknowledged at once but echoed only after the stop.

    The acknowledgement goes out after ``readline`` returned, so when the
    client has it, the server has read the line; the echo waits on the cancel
    token, which the server sets when it starts stopping. That line is thus
    exactly "read but not yet answered" when the stop begins.
    """
    while line := conn.readline():
        if line.startswith(b"H"):
            conn.sendall(READ_ACK)
            conn.cancel_token.wait()
        conn.sendall(line)


def sigterm_on_this_thread(conn: Connection) -> None:
    """Echo lines; the line ``TERM`` raises SIGTERM in this connection's thread instead.

    The kernel hands a signal sent to the process to any thread that does not
    block it, not always the main one: this makes that happen on purpose. The
    reply comes after the signal, so the client knows it has been raised.
    """
    while line := conn.readline():
        if line == b"TERM\n":
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            line = f"raised in {os.getpid()}\n".encode()
        conn.sendall(line)


def stuck_on_request(conn: Connection) -> None:
    """Echo lines; after the line ``STUCK`` (acknowledged), block in a call ignoring the token."""
    while line := conn.readline():
        if line == b"STUCK\n":
            conn.sendall(READ_ACK)
            sleep_ignoring_the_token()
        conn.sendall(line)


def sleep_ignoring_the_token() -> None:
    # A stand-in for a blocking call the handler cannot interrupt (a C library
    # call, a lock held elsewhere): it neither polls the connection nor checks
    # the cancel token. The test looks for this function's name in the stack
    # the server logs.
    time.sleep(3600)
