"""Shared test helpers: loopback clients and bounded waits (never bare sleeps)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

NOTICE = b"Shutting down!\n"


def connect(address: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes: {bytes(data)!r}")
        data += chunk
    return bytes(data)


def recv_until_eof(sock: socket.socket) -> bytes:
    """Everything until a clean EOF; a reset raises, which is what tests check."""
    data = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait for a condition on server counters, bounded in time."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
