"""How a connection's end is sorted: each exception to its reason, notice and close."""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator
from typing import Any

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
def connection() -> Iterator[tuple[Connection, socket.socket]]:
    """A Connection over a socket pair, and its client's end; a stop descriptor nobody writes to."""
    stop_r, stop_w = socket.socketpair()
    server_side, client_side = socket.socketpair()
    server_side.setblocking(False)
    conn = Connection(server_side, "test", stop_fd=stop_r.fileno(), timeouts=Timeouts())
    try:
        yield conn, client_side
    finally:
        conn._sock.close()  # A TLS socket, if a handshake took the descriptor over.
        for sock in (server_side, client_side, stop_r, stop_w):
            sock.close()


@pytest.fixture
def gone_client_error(connection: tuple[Connection, socket.socket]) -> OSError:
    """What the Connection's write raises once its client has gone (the kernel may take some)."""
    conn, client = connection
    client.close()
    for _ in range(100):
        try:
            conn.sendall(b"x" * 65536)
        except OSError as exc:
            return exc
    raise AssertionError("writes to a gone client kept succeeding")


def test_a_handler_that_returns_completes() -> None:
    assert Ending("closed", CloseReason.COMPLETED) == COMPLETED


R = CloseReason


def case(exc: Exception, expected: Ending, *, stopping: bool = False, tls: bool = False) -> Any:
    """One row of TABLE, named after the exception and the server's state."""
    state = "".join(("-stopping" if stopping else "", "-tls" if tls else ""))
    return pytest.param(exc, stopping, tls, expected, id=f"{type(exc).__name__}{state}")


def handler_error(outcome: str) -> Ending:
    return Ending(outcome, R.HANDLER_ERROR, handler_error=True)


# What each exception comes to, raised by the handler itself (its traceback
# ends in the handler, not in a Connection method). Whole Endings, so that
# no field goes unchecked.
TABLE = [
    # Limits and timeouts: the client is told why, then a lingering close.
    case(FrameTooLarge(10), Ending("frame exceeds the limit of 10 bytes", R.TOO_LARGE, b"big\n")),
    case(ReadTimeout("no line", kind="read"), Ending("no line", R.READ_TIMEOUT, b"late\n")),
    case(ReadTimeout("idle", kind="idle"), Ending("idle", R.TIMEOUT, b"late\n")),
    case(ReadTimeout("old", kind="lifetime"), Ending("old", R.TIMEOUT, b"late\n"), stopping=True),
    case(
        IncompleteRead(b"ab", 4), Ending("stream ended after 2 bytes, before 4 bytes", R.INCOMPLETE)
    ),
    case(ConnectionTimeout("over"), Ending("over", R.TIMEOUT)),
    # A peer that reads (or says) nothing, a bad proxy: closed at once, told nothing.
    case(WriteTimeout("stuck"), Ending("stuck", R.WRITE_TIMEOUT, abandon=True)),
    case(WriteTimeout("stuck"), Ending("stuck", R.WRITE_TIMEOUT, abandon=True), stopping=True),
    case(HandshakeTimeout("mute"), Ending("mute", R.HANDSHAKE_TIMEOUT, abandon=True), tls=True),
    case(ProxyProtocolError("bad"), Ending("PROXY protocol: bad", R.PROXY_ERROR, abandon=True)),
    # Setup ended: by the stop (the goodbye is still said) or by the peer.
    case(Aborted("stop", stopping=True), Ending("stop", R.STOPPED), stopping=True),
    case(Aborted("stop", stopping=True), Ending("stop", R.RESET)),
    case(Aborted("gone"), Ending("gone", R.RESET, abandon=True)),
    case(Aborted("gone"), Ending("gone", R.STOPPED, abandon=True), stopping=True),
    # Over the per-address limit behind a proxy: told busy, except over TLS.
    case(Refused("over"), Ending("over", R.REFUSED, b"busy\n")),
    case(Refused("over"), Ending("over", R.REFUSED), tls=True),
    # The handler's own socket failing is its error, during a stop too.
    case(ConnectionResetError(errno.ECONNRESET, "reset"), handler_error("reset")),
    case(ConnectionResetError(errno.ECONNRESET, "reset"), handler_error("reset"), stopping=True),
    case(OSError("no errno"), handler_error("no errno")),
    # Anything else is a bug in the handler.
    case(KeyError("x"), handler_error("handler error")),
    case(KeyError("x"), handler_error("handler error"), stopping=True, tls=True),
]


@pytest.mark.parametrize(("exc", "stopping", "tls", "expected"), TABLE)
def test_each_exception_comes_to_its_ending(
    exc: Exception, stopping: bool, tls: bool, expected: Ending
) -> None:
    assert end(raised(exc), stopping=stopping, tls=tls) == expected


def test_a_client_that_went_away_is_a_reset_not_a_handler_error(gone_client_error: OSError) -> None:
    exc = gone_client_error
    assert exc.errno in (errno.EPIPE, errno.ECONNRESET)
    assert raised_by_connection(exc)
    assert end(exc) == Ending(exc.strerror or "", CloseReason.RESET)


def test_during_the_stop_any_error_of_the_connection_itself_is_expected(
    gone_client_error: OSError,
) -> None:
    # An errno outside the "peer gone" set, from the Connection, while stopping.
    exc = gone_client_error
    exc.errno = errno.EIO
    assert end(exc).reason is CloseReason.HANDLER_ERROR
    assert end(exc, stopping=True).reason is CloseReason.RESET


def test_a_tls_error_raised_outside_the_connection_is_the_handlers_own() -> None:
    # Made in Python, it has no OpenSSL reason: the message stands in for it.
    exc = raised(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"))
    assert end(exc) == Ending(f"TLS error: {exc}", CloseReason.TLS_ERROR, handler_error=True)


def test_a_tls_error_of_the_connections_own_handshake_is_not_the_handlers(
    connection: tuple[Connection, socket.socket],
) -> None:
    conn, client = connection
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost").configure_cert(context)
    client.sendall(b"GET / HTTP/1.0\r\n\r\n")  # Plain text where a hello belongs.
    with pytest.raises(ssl.SSLError) as info:
        conn._tls_handshake(context)
    assert raised_by_connection(info.value)
    assert end(info.value) == Ending(f"TLS error: {info.value.reason}", CloseReason.TLS_ERROR)
