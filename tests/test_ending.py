"""How a connection's end is sorted: each exception to its reason, notice and close."""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator

import pytest
import trustme

from threadserve import (
    ConnectionTimeout,
    FrameTooLarge,
    HandshakeTimeout,
    IncompleteRead,
    Notices,
    ProxyProtocolError,
    ReadTimeout,
    Timeouts,
    WriteTimeout,
)
from threadserve._connection import Connection
from threadserve._ending import COMPLETED, Ending, ending_of, raised_by_connection
from threadserve._events import CloseReason
from threadserve._setup import Aborted, Refused

NOTICES = Notices(busy=b"busy\n", timed_out=b"late\n", too_large=b"big\n")


def end(exc: Exception, *, stopping: bool = False, tls: bool = False) -> Ending:
    return ending_of(exc, stopping=stopping, notices=NOTICES, tls=tls)


def raised(exc: Exception) -> Exception:
    """``exc`` with a traceback that ends in this file, as if the handler raised it."""
    try:
        raise exc
    except Exception as caught:
        return caught


@pytest.fixture
def stop_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A stop descriptor pair nobody writes to."""
    stop_r, stop_w = socket.socketpair()
    with stop_r, stop_w:
        yield stop_r, stop_w


@pytest.fixture
def gone_client(stop_pair: tuple[socket.socket, socket.socket]) -> Iterator[Connection]:
    """A Connection whose client has gone: its next write raises from the Connection."""
    server_side, client_side = socket.socketpair()
    client_side.close()
    server_side.setblocking(False)
    with server_side:
        yield Connection(server_side, "test", stop_fd=stop_pair[0].fileno(), timeouts=Timeouts())


def error_from(conn: Connection) -> OSError:
    """The error a write to the gone client raises (the kernel may take the first ones)."""
    for _ in range(100):
        try:
            conn.sendall(b"x" * 65536)
        except OSError as exc:
            return exc
    raise AssertionError("writes to a reset client kept succeeding")


def test_a_handler_that_returns_completes() -> None:
    assert Ending("closed", CloseReason.COMPLETED) == COMPLETED


# What each exception comes to, raised by the handler itself (its traceback
# ends in the handler, not in a Connection method): (exception, stopping,
# tls, the whole Ending). Whole Endings, so that no field goes unchecked.
TABLE = [
    # Limits and timeouts: the client is told why, then a lingering close.
    (
        FrameTooLarge(10),
        False,
        False,
        Ending("frame exceeds the limit of 10 bytes", CloseReason.TOO_LARGE, b"big\n"),
    ),
    (
        ReadTimeout("no line", kind="read"),
        False,
        False,
        Ending("no line", CloseReason.READ_TIMEOUT, b"late\n"),
    ),
    (
        ReadTimeout("idle", kind="idle"),
        False,
        False,
        Ending("idle", CloseReason.TIMEOUT, b"late\n"),
    ),
    (
        ReadTimeout("old", kind="lifetime"),
        True,
        False,
        Ending("old", CloseReason.TIMEOUT, b"late\n"),
    ),
    (
        IncompleteRead(b"ab", 4),
        False,
        False,
        Ending("stream ended after 2 bytes, before 4 bytes", CloseReason.INCOMPLETE),
    ),
    (ConnectionTimeout("over"), False, False, Ending("over", CloseReason.TIMEOUT)),
    # A peer that reads (or says) nothing, a bad proxy: closed at once, told nothing.
    (
        WriteTimeout("took nothing"),
        False,
        False,
        Ending("took nothing", CloseReason.WRITE_TIMEOUT, abandon=True),
    ),
    (
        WriteTimeout("took nothing"),
        True,
        False,
        Ending("took nothing", CloseReason.WRITE_TIMEOUT, abandon=True),
    ),
    (
        HandshakeTimeout("no hello"),
        False,
        True,
        Ending("no hello", CloseReason.HANDSHAKE_TIMEOUT, abandon=True),
    ),
    (
        ProxyProtocolError("bad"),
        False,
        False,
        Ending("PROXY protocol: bad", CloseReason.PROXY_ERROR, abandon=True),
    ),
    # Setup ended: by the stop (the goodbye is still said) or by the peer.
    (Aborted("stopping", stopping=True), True, False, Ending("stopping", CloseReason.STOPPED)),
    (Aborted("stopping", stopping=True), False, False, Ending("stopping", CloseReason.RESET)),
    (Aborted("peer left"), False, False, Ending("peer left", CloseReason.RESET, abandon=True)),
    (Aborted("peer left"), True, False, Ending("peer left", CloseReason.STOPPED, abandon=True)),
    # Over the per-address limit behind a proxy: told busy, except over TLS.
    (Refused("over"), False, False, Ending("over", CloseReason.REFUSED, b"busy\n")),
    (Refused("over"), False, True, Ending("over", CloseReason.REFUSED)),
    # The handler's own socket failing is its error, during a stop too.
    (
        ConnectionResetError(errno.ECONNRESET, "reset"),
        False,
        False,
        Ending("reset", CloseReason.HANDLER_ERROR, handler_error=True),
    ),
    (
        ConnectionResetError(errno.ECONNRESET, "reset"),
        True,
        False,
        Ending("reset", CloseReason.HANDLER_ERROR, handler_error=True),
    ),
    (
        OSError("no errno"),
        False,
        False,
        Ending("no errno", CloseReason.HANDLER_ERROR, handler_error=True),
    ),
    # Anything else is a bug in the handler.
    (
        KeyError("x"),
        False,
        False,
        Ending("handler error", CloseReason.HANDLER_ERROR, handler_error=True),
    ),
    (
        KeyError("x"),
        True,
        True,
        Ending("handler error", CloseReason.HANDLER_ERROR, handler_error=True),
    ),
]


@pytest.mark.parametrize(("exc", "stopping", "tls", "expected"), TABLE)
def test_each_exception_comes_to_its_ending(
    exc: Exception, stopping: bool, tls: bool, expected: Ending
) -> None:
    assert end(raised(exc), stopping=stopping, tls=tls) == expected


def test_a_client_that_went_away_is_a_reset_not_a_handler_error(gone_client: Connection) -> None:
    exc = error_from(gone_client)
    assert exc.errno in (errno.EPIPE, errno.ECONNRESET)
    assert raised_by_connection(exc)
    assert end(exc) == Ending(exc.strerror or "", CloseReason.RESET)


def test_during_the_stop_any_error_of_the_connection_itself_is_expected(
    gone_client: Connection,
) -> None:
    # An errno outside the "peer gone" set, from the Connection, while stopping.
    exc = error_from(gone_client)
    exc.errno = errno.EIO
    assert end(exc).reason is CloseReason.HANDLER_ERROR
    assert end(exc, stopping=True).reason is CloseReason.RESET


def test_a_tls_error_raised_outside_the_connection_is_the_handlers_own() -> None:
    # Made in Python, it has no OpenSSL reason: the message stands in for it.
    exc = raised(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"))
    assert end(exc) == Ending(f"TLS error: {exc}", CloseReason.TLS_ERROR, handler_error=True)


def test_a_tls_error_of_the_connections_own_handshake_is_not_the_handlers(
    stop_pair: tuple[socket.socket, socket.socket],
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost").configure_cert(context)
    server_side, client_side = socket.socketpair()
    with server_side, client_side:
        server_side.setblocking(False)
        conn = Connection(server_side, "test", stop_fd=stop_pair[0].fileno(), timeouts=Timeouts())
        client_side.sendall(b"GET / HTTP/1.0\r\n\r\n")  # Plain text where a hello belongs.
        try:
            with pytest.raises(ssl.SSLError) as info:
                conn._tls_handshake(context)
        finally:
            conn._sock.close()  # The TLS socket, which took over the descriptor.
    assert raised_by_connection(info.value)
    assert end(info.value) == Ending(f"TLS error: {info.value.reason}", CloseReason.TLS_ERROR)
