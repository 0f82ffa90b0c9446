"""threadserve handlers used by the benchmarks.

Run as `python -m threadserve serve bench.handlers:blocking_echo ...` from the
repository root, so that `bench` is importable.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from typing import Any, Protocol

from bench.peers._common import BLOCKING_SECONDS
from threadserve._accel import poll_recv


class ChunkConnection(Protocol):
    """The part of threadserve's `Connection` these handlers use.

    Typed structurally so the benchmarks type-check on their own.
    """

    def __iter__(self) -> Iterator[bytes]: ...

    def sendall(self, data: bytes, /) -> None: ...


def blocking_echo(conn: ChunkConnection) -> None:
    """Echo each received chunk after a 10 ms blocking call, in plain code.

    This is the case thread-per-connection is for: the handler just calls the
    blocking function, with no executor and no await.
    """
    for chunk in conn:
        time.sleep(BLOCKING_SECONDS)
        conn.sendall(chunk)


# Diagnostic handlers for `python -m bench.cost_per_request`: the bare loop's
# body run inside threadserve, on the accepted socket itself, so that the cost
# of the Connection read/write path can be told apart from the rest of the
# server (its threads, registry, limits and stop machinery). They reach for the
# Connection's private socket (and stop descriptor) on purpose; no application
# should. They measure serving: the bare loop ignores the stop, the polled one
# just ends when it sees it.


def _socket_of(conn: Any) -> socket.socket:
    sock: socket.socket = conn._sock
    return sock


def _bare_socket_loop(conn: Any, pause: float) -> None:
    """The bare loop: a blocking recv, then sendall."""
    sock = _socket_of(conn)
    sock.setblocking(True)
    while data := sock.recv(65536):
        if pause:
            time.sleep(pause)
        sock.sendall(data)


def _polled_socket_loop(conn: Any, pause: float) -> None:
    """The bare loop with threadserve's way of reading.

    Wait on the socket and the connection's stop descriptor together, then a
    non-blocking ``recv``; the stop, when its descriptor fires, ends the loop.
    The wait and the read are the compiled ``poll_recv`` the Connection uses
    where it was built (one release of the GIL for both), else ``poll`` and
    ``recv`` in Python, as the Connection then does.
    """
    sock = _socket_of(conn)
    fd = sock.fileno()
    stop_fd: int = conn._stop_fd
    poller = select.poll()  # Made once per connection; waited on only without poll_recv.
    poller.register(fd, select.POLLIN)
    poller.register(stop_fd, select.POLLIN)
    while True:
        if poll_recv is not None:
            result = poll_recv(fd, stop_fd, 65536, -1)
            if result is None:
                continue  # Nothing to read after all: wait again.
            if not isinstance(result, bytes):
                return  # The stop.
            data = result
        else:
            if any(ready == stop_fd for ready, _mask in poller.poll()):
                return
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
        if not data:
            return
        if pause:
            time.sleep(pause)
        # One non-blocking send, as threadserve's sendall tries first; a
        # client slow to read (never, in these workloads) gets the rest blocking.
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            sock.setblocking(True)
            sock.sendall(data[sent:])
            sock.setblocking(False)


def bare_socket_echo(conn: Any) -> None:
    _bare_socket_loop(conn, 0.0)


def bare_socket_blocking_echo(conn: Any) -> None:
    _bare_socket_loop(conn, BLOCKING_SECONDS)


def polled_socket_echo(conn: Any) -> None:
    _polled_socket_loop(conn, 0.0)


def polled_socket_blocking_echo(conn: Any) -> None:
    _polled_socket_loop(conn, BLOCKING_SECONDS)
