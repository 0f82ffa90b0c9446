"""Built-in handlers. A handler is any callable taking a ``Connection``."""

from __future__ import annotations

from ._connection import Connection


def echo(conn: Connection) -> None:
    """Send back every byte received, in order, until the client or the server ends it.

    This is the seed article's echo server; the goodbye notice on stop comes
    from the server, after this returns.
    """
    for chunk in conn:
        conn.sendall(chunk)


def echo_lines(conn: Connection) -> None:
    """Send back each whole line; a line over 64 KiB ends the connection with a notice."""
    while line := conn.readline():
        conn.sendall(line)


def discard(conn: Connection) -> None:
    """Read and drop everything (RFC 863); useful as a load sink."""
    for _chunk in conn:
        pass


BUILTIN_HANDLERS = {"echo": echo, "lines": echo_lines, "discard": discard}
