"""The benchmark harness waits for a server to let go of a finished run's clients.

A measured run started while the server is still ending the throwaway run's
connections measures that ending; `ServerProcess.wait_settled` is what keeps
it from doing so, and what reports a server that never lets go. Driven here
against a small subprocess server on loopback.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from support import SETTLE, wait_until

from bench.server import ServerProcess, free_port

# A thread per connection; "close" mode closes a connection at the client's
# EOF, "hold" mode never closes one (a server stuck behind its clients).
SERVER = """
import socket, sys, threading
mode, port = sys.argv[1], int(sys.argv[2])
held = []
def serve(conn):
    while conn.recv(4096):
        pass
    if mode == "close":
        conn.close()
    else:
        held.append(conn)
listener = socket.create_server(("127.0.0.1", port), backlog=128)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

CLIENTS = 20


def _server(mode: str) -> Iterator[ServerProcess]:
    port = free_port()
    with ServerProcess([sys.executable, "-c", SERVER, mode, str(port)], port, None) as server:
        server.wait_listening(timeout=SETTLE)
        yield server


@pytest.fixture
def closing_server() -> Iterator[ServerProcess]:
    yield from _server("close")


@pytest.fixture
def holding_server() -> Iterator[ServerProcess]:
    yield from _server("hold")


def _connect_and_leave(server: ServerProcess) -> None:
    """Open CLIENTS connections, wait until the server holds them all, close them all."""
    with ExitStack() as stack:
        for _ in range(CLIENTS):
            client = socket.create_connection(("127.0.0.1", server.port), timeout=SETTLE)
            stack.enter_context(client)
            client.sendall(b"x")
        # Accepted by the server: its own descriptors show every one.
        wait_until(
            lambda: server.held_connections() == CLIENTS,
            what=f"the server to hold {CLIENTS} connections",
            state=server.held_connections,
        )


def test_a_server_that_closes_its_clients_settles(closing_server: ServerProcess) -> None:
    _connect_and_leave(closing_server)
    settle = closing_server.wait_settled(timeout=SETTLE)
    assert settle.held == 0
    assert settle.seconds < SETTLE


def test_a_server_that_keeps_its_clients_is_reported_not_waited_on(
    holding_server: ServerProcess,
) -> None:
    _connect_and_leave(holding_server)
    settle = holding_server.wait_settled(timeout=0.5)
    assert settle.held == CLIENTS
    assert settle.seconds >= 0.5  # it waited out its bound before reporting
    assert settle.threads >= 1
