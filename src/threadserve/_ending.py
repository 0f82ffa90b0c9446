"""How a connection ended: from what its handler raised to a reason, a notice and a way to close.

Every ``Exception`` a connection's setup or handler raises is sorted here,
in one place and without sockets, so that each has its own test
(tests/test_ending.py) and the server's connection loop only carries out
the answer (a ``BaseException`` such as ``SystemExit`` is not caught: the
connection is then closed as if the handler had returned):

- ``reason``: the ``CloseReason`` counted and logged;
- ``notice``: the line the client is told before the close (None: none);
- ``abandon``: close at once, with no notice and no lingering close (no
  goodbye either, even at a stop), for a client that reads nothing or a
  proxy that must hear nothing;
- ``handler_error``: the server logs the traceback and counts it.

The order of the checks matters where the classes overlap: ``ssl.SSLError``
and every timeout (``ConnectionTimeout`` is a ``TimeoutError``) are
``OSError`` too, and must be sorted before the plain ``OSError`` of a client
that went away.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from . import _connection as _connection_module
from . import _setup
from ._connection import PEER_GONE_ERRNOS
from ._events import CloseReason
from ._exceptions import (
    ConnectionTimeout,
    FrameTooLarge,
    HandshakeTimeout,
    IncompleteRead,
    ProxyProtocolError,
    ReadTimeout,
    WriteTimeout,
)
from ._notices import Notices


@dataclass(frozen=True)
class Ending:
    """What the server does about a connection's end, and how it logs and counts it."""

    outcome: str  # The log line's account of it.
    reason: CloseReason
    notice: bytes | None = None
    abandon: bool = False
    handler_error: bool = False


#: The handler returned.
COMPLETED = Ending("closed", CloseReason.COMPLETED)


def ending_of(exc: Exception, *, stopping: bool, notices: Notices, tls: bool) -> Ending:
    """The ending for a connection whose handler (or setup) raised ``exc``.

    ``stopping``: the server is stopping (not to be confused with
    ``Aborted.stopping``, which says the setup itself was ended by the
    stop); ``tls``: the listener speaks TLS, where a notice in plain text
    would be a protocol error.
    """
    if isinstance(exc, ProxyProtocolError):
        # Malformed, truncated or late: the handler never ran. The proxy reads nothing from us.
        return Ending(f"PROXY protocol: {exc}", CloseReason.PROXY_ERROR, abandon=True)
    if isinstance(exc, _setup.Aborted):
        # Stopping: the proxy (and its client) still hear the goodbye.
        reason = CloseReason.STOPPED if stopping else CloseReason.RESET
        return Ending(str(exc), reason, abandon=not exc.stopping)
    if isinstance(exc, _setup.Refused):
        return Ending(str(exc), CloseReason.REFUSED, notice=None if tls else notices.busy)
    if isinstance(exc, FrameTooLarge):
        return Ending(str(exc), CloseReason.TOO_LARGE, notice=notices.too_large)
    if isinstance(exc, ReadTimeout):
        # "read_timeout" is the read timeout's own (a frame too slow); the
        # idle and lifetime timeouts count as "timeout".
        reason = CloseReason.READ_TIMEOUT if exc.kind == "read" else CloseReason.TIMEOUT
        return Ending(str(exc), reason, notice=notices.timed_out)
    if isinstance(exc, WriteTimeout):
        # The client reads nothing: a notice or a lingering close would only
        # hold the thread longer. Close at once.
        return Ending(str(exc), CloseReason.WRITE_TIMEOUT, abandon=True)
    if isinstance(exc, HandshakeTimeout):
        # The client says nothing (or too slowly to finish a hello): the same.
        return Ending(str(exc), CloseReason.HANDSHAKE_TIMEOUT, abandon=True)
    if isinstance(exc, IncompleteRead):
        return Ending(str(exc), CloseReason.INCOMPLETE)
    if isinstance(exc, ConnectionTimeout):
        return Ending(str(exc), CloseReason.TIMEOUT)
    if isinstance(exc, ssl.SSLError):
        # The handler's own TLS (to a backend, say) failing is its error.
        # OpenSSL's errors carry a short reason; one made in Python has none.
        return Ending(
            f"TLS error: {getattr(exc, 'reason', None) or exc}",
            CloseReason.TLS_ERROR,
            handler_error=not raised_by_connection(exc),
        )
    if isinstance(exc, OSError):
        # The client going away is expected; the same error from the
        # handler's own sockets (a database connection, say) is a bug to see.
        expected = (exc.errno in PEER_GONE_ERRNOS or stopping) and raised_by_connection(exc)
        return Ending(
            exc.strerror or str(exc),
            CloseReason.RESET if expected else CloseReason.HANDLER_ERROR,
            handler_error=not expected,
        )
    return Ending("handler error", CloseReason.HANDLER_ERROR, handler_error=True)


def raised_by_connection(exc: BaseException) -> bool:
    """Whether ``exc`` came out of this connection's own I/O (a Connection method).

    The innermost frame of such an error is a Connection method, or the
    standard library's socket/ssl wrappers it called. Errors from anything
    else the handler does (its database driver, say) end elsewhere.
    """
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    for filename in reversed(frames):
        if filename not in _IO_WRAPPER_FILES:
            return filename == _connection_module.__file__
    return False


#: Library modules between a Connection method and the system call.
_IO_WRAPPER_FILES = frozenset({ssl.__file__, socket.__file__})
