"""Handlers for servers run behind a load balancer in a subprocess (``proxy_handlers:NAME``)."""

from __future__ import annotations

from threadserve import Connection


def tell_peer(conn: Connection) -> None:
    """Say who the client is (as the PROXY header reported it), then echo one line."""
    conn.sendall(f"{conn.peer}\n".encode())
    line = conn.readline(1024)
    if line:
        conn.sendall(line)
