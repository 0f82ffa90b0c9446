"""The diagnostic handlers behind `python -m bench.cost_per_request` echo as they should.

They run the bare loop's body (or its poll-then-recv variant) on the socket
threadserve accepted; a handler that echoed nothing, or dropped bytes, would
make that tool compare a server that does less work. Each is driven here over
loopback with two requests and a client EOF, and must leave nothing behind.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import ServerFactory
from support import StopInBackground, connect, recv_exactly, recv_until_eof

from bench import handlers
from bench.peers._common import BLOCKING_SECONDS

REQUESTS = (b"x" * 1024, bytes(range(256)) * 4)


@pytest.mark.parametrize(
    ("handler", "pause"),
    [
        (handlers.bare_socket_echo, 0.0),
        (handlers.bare_socket_blocking_echo, BLOCKING_SECONDS),
        (handlers.polled_socket_echo, 0.0),
        (handlers.polled_socket_blocking_echo, BLOCKING_SECONDS),
    ],
)
def test_diagnostic_handlers_echo_every_byte(
    serve: ServerFactory, handler: Callable[[Any], None], pause: float
) -> None:
    server = serve(handler)
    with connect(server.tcp_address) as client:
        for request in REQUESTS:
            started = time.monotonic()
            client.sendall(request)
            assert recv_exactly(client, len(request)) == request
            # The blocking variants wait before each reply, as the workload says.
            assert time.monotonic() - started >= pause
        client.shutdown(socket.SHUT_WR)  # The handler sees EOF and returns.
        assert recv_until_eof(client) == b""
    report = server.stop()
    assert report is not None
    assert report.forced == 0


@pytest.mark.parametrize(
    "handler", [handlers.polled_socket_echo, handlers.polled_socket_blocking_echo]
)
def test_polled_handlers_end_at_the_stop(
    serve: ServerFactory, handler: Callable[[Any], None]
) -> None:
    """They poll the stop descriptor as the Connection does, so a stop ends them, unforced."""
    server = serve(handler)
    with connect(server.tcp_address) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        stopping = StopInBackground(server)
        recv_until_eof(client)  # The goodbye, then EOF: the handler has returned.
    report = stopping.join()
    assert report.forced == 0
    assert report.drained == 1
