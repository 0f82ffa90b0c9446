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
    assert COMPLETED.reason is CloseReason.COMPLETED
    assert (COMPLETED.notice, COMPLETED.abandon, COMPLETED.handler_error) == (None, False, False)


@pytest.mark.parametrize(
    ("exc", "reason", "notice"),
    [
        (FrameTooLarge(10), CloseReason.TOO_LARGE, b"big\n"),
        (ReadTimeout("no line", kind="read"), CloseReason.READ_TIMEOUT, b"late\n"),
        (ReadTimeout("idle", kind="idle"), CloseReason.TIMEOUT, b"late\n"),
        (ReadTimeout("too old", kind="lifetime"), CloseReason.TIMEOUT, b"late\n"),
        (IncompleteRead(b"ab", 4), CloseReason.INCOMPLETE, None),
        (ConnectionTimeout("over"), CloseReason.TIMEOUT, None),
    ],
)
def test_limits_and_timeouts_tell_the_client_why_then_close_gracefully(
    exc: Exception, reason: CloseReason, notice: bytes | None
) -> None:
    ending = end(raised(exc))
    assert (ending.reason, ending.notice) == (reason, notice)
    assert not ending.abandon, "a client that is still reading gets a lingering close"
    assert not ending.handler_error
    assert ending.outcome == str(exc)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (WriteTimeout("took nothing"), CloseReason.WRITE_TIMEOUT),
        (HandshakeTimeout("no hello"), CloseReason.HANDSHAKE_TIMEOUT),
        (ProxyProtocolError("not a PROXY header"), CloseReason.PROXY_ERROR),
    ],
)
def test_a_peer_that_reads_nothing_or_a_bad_proxy_is_closed_at_once(
    exc: Exception, reason: CloseReason
) -> None:
    ending = end(raised(exc))
    assert (ending.reason, ending.notice, ending.abandon) == (reason, None, True)
    assert not ending.handler_error


def test_a_proxy_error_names_the_protocol_in_the_log() -> None:
    assert end(raised(ProxyProtocolError("bad"))).outcome == "PROXY protocol: bad"


@pytest.mark.parametrize("stopping", [False, True])
def test_a_setup_ended_by_the_stop_still_says_goodbye(stopping: bool) -> None:
    by_stop = end(raised(Aborted("stopping", stopping=True)), stopping=stopping)
    assert not by_stop.abandon, "the proxy and its client hear the goodbye"
    by_peer = end(raised(Aborted("peer left")), stopping=stopping)
    assert by_peer.abandon
    expected = CloseReason.STOPPED if stopping else CloseReason.RESET
    assert by_stop.reason is by_peer.reason is expected


@pytest.mark.parametrize(("tls", "notice"), [(False, b"busy\n"), (True, None)])
def test_a_refused_client_is_told_busy_except_over_tls(tls: bool, notice: bytes | None) -> None:
    ending = end(raised(Refused("over the per-address limit")), tls=tls)
    assert (ending.reason, ending.notice, ending.abandon) == (CloseReason.REFUSED, notice, False)


def test_an_unexpected_exception_is_a_handler_error() -> None:
    ending = end(raised(KeyError("x")))
    assert (ending.reason, ending.handler_error) == (CloseReason.HANDLER_ERROR, True)
    assert ending.outcome == "handler error"


def test_a_client_that_went_away_is_a_reset_not_a_handler_error(gone_client: Connection) -> None:
    exc = error_from(gone_client)
    assert exc.errno in (errno.EPIPE, errno.ECONNRESET)
    assert raised_by_connection(exc)
    ending = end(exc)
    assert (ending.reason, ending.handler_error) == (CloseReason.RESET, False)


def test_the_same_error_from_the_handlers_own_socket_is_a_handler_error() -> None:
    exc = raised(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert not raised_by_connection(exc)
    ending = end(exc)
    assert (ending.reason, ending.handler_error) == (CloseReason.HANDLER_ERROR, True)
    assert ending.outcome == "Connection reset by peer"


def test_during_the_stop_any_error_of_the_connection_itself_is_expected(
    gone_client: Connection,
) -> None:
    # An errno outside the "peer gone" set, from the Connection, while stopping.
    exc = error_from(gone_client)
    exc.errno = errno.EIO
    assert end(exc).reason is CloseReason.HANDLER_ERROR
    assert end(exc, stopping=True).reason is CloseReason.RESET


def test_a_tls_error_is_the_handlers_own_unless_the_connection_raised_it() -> None:
    exc = raised(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"))
    ending = end(exc)
    assert ending.reason is CloseReason.TLS_ERROR
    assert ending.handler_error, "raised outside the Connection: the handler's own TLS"
    assert ending.outcome == f"TLS error: {exc}"


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
    ending = end(info.value)
    assert (ending.reason, ending.handler_error) == (CloseReason.TLS_ERROR, False)
    assert ending.outcome == f"TLS error: {info.value.reason}"
