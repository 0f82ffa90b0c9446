"""Helpers for testing handlers against a real server on loopback.

Example::

    from threadserve.testing import running_server

    def test_echo() -> None:
        with running_server(echo) as server, socket.create_connection(server.tcp_address) as s:
            s.sendall(b"hi")
            assert s.recv(2) == b"hi"
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._server import Handler, Server


class RunningServer(Server):
    """A ``Server`` with a convenience for connecting to its first TCP address."""

    @property
    def tcp_address(self) -> tuple[str, int]:
        """(host, port) of the first TCP listener, ready for ``socket.create_connection``."""
        for address in self.addresses:
            if not address.startswith("unix:"):
                host, _, port = address.rpartition(":")
                return host.strip("[]"), int(port)
        raise LookupError("this server has no TCP listener")


@contextmanager
def running_server(
    handler: Handler, bind: str = "127.0.0.1:0", **settings: Any
) -> Iterator[RunningServer]:
    """Run a server on a free loopback port in a background thread; stop it on exit."""
    settings.setdefault("handle_signals", False)
    server = RunningServer(handler, bind, **settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()
