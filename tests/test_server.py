"""Server: counters, the live-connection list, states, lifecycle, handler errors, idle cost."""

from __future__ import annotations

import functools
import logging
import queue
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from conftest import ServerFactory
from support import NOTICE, Probe, connect, recv_exactly, recv_until_eof, wait_until

import threadserve._server
from threadserve import (
    ConfigurationError,
    Connection,
    Server,
    StopReport,
    Timeouts,
    echo,
    serve,
)
from threadserve.testing import RunningServer


def open_fds() -> int:
    return psutil.Process().num_fds()


def reset(client: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def records_at_or_above(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@pytest.fixture
def unstarted() -> Iterator[Callable[..., Server]]:
    """Servers that are bound but not started; each is stopped at teardown."""
    servers: list[Server] = []

    def make(handler: Callable[[Connection], object] = echo, **settings: Any) -> Server:
        settings.setdefault("handle_signals", False)
        server = Server(handler, "127.0.0.1:0", **settings)
        servers.append(server)
        return server

    yield make
    for server in servers:
        # Only once: stop() after a finished stop writes to the closed control
        # pipe, a descriptor number the process may have reused since.
        if not server.stopping:
            server.stop()


# ---------------------------------------------------------------- statistics and connections


def test_statistics_count_connections_and_bytes_live_and_closed(serve: ServerFactory) -> None:
    server = serve(echo)
    fresh = server.statistics()
    assert (fresh.connections_active, fresh.connections_accepted, fresh.connections_closed) == (
        0,
        0,
        0,
    )
    clients = [connect(server.tcp_address) for _ in range(3)]
    try:
        for index, client in enumerate(clients):
            message = b"m" * (10 * (index + 1))  # 10, 20 and 30 bytes.
            client.sendall(message)
            assert recv_exactly(client, len(message)) == message
        wait_until(lambda: server.statistics().bytes_sent == 60)
        live = server.statistics()
        assert (live.connections_active, live.connections_accepted) == (3, 3)
        assert (live.connections_closed, live.bytes_received, live.bytes_sent) == (0, 60, 60)
        clients[0].close()
        clients[1].close()
        wait_until(lambda: server.statistics().connections_closed == 2)
        after = server.statistics()
        # Closed connections' bytes stay counted.
        assert (after.connections_active, after.connections_accepted) == (1, 3)
        assert (after.bytes_received, after.bytes_sent) == (60, 60)
        assert (after.handler_errors, after.accept_errors, after.connections_rejected) == (0, 0, 0)
    finally:
        for client in clients:
            client.close()


def test_connections_lists_the_live_connections_as_a_copy(serve: ServerFactory) -> None:
    server = serve(echo)
    with connect(server.tcp_address) as first, connect(server.tcp_address) as second:
        wait_until(lambda: len(server.connections()) == 2)
        listed = server.connections()
        assert all(isinstance(conn, Connection) for conn in listed)
        expected = {f"127.0.0.1:{sock.getsockname()[1]}" for sock in (first, second)}
        assert {conn.peer for conn in listed} == expected
        listed.clear()  # The caller's list, not the registry.
        assert len(server.connections()) == 2
        first.close()
        wait_until(lambda: len(server.connections()) == 1)
        assert [conn.peer for conn in server.connections()] == [
            f"127.0.0.1:{second.getsockname()[1]}"
        ]


# ---------------------------------------------------------------- states and lifecycle


def test_repr_goes_from_bound_to_serving_to_stopping_to_stopped(
    unstarted: Callable[..., Server],
) -> None:
    release = threading.Event()

    def hold_after_cancel(conn: Connection) -> None:
        conn.cancel_token.wait(10)
        release.wait(10)  # Keeps the server in its stopping state until the test has looked.

    server = unstarted(hold_after_cancel)
    address = server.addresses[0]
    assert repr(server) == f"<Server bound on {address} connections=0>"
    server.start()
    assert repr(server) == f"<Server serving on {address} connections=0>"
    with socket.create_connection(("127.0.0.1", port_of(address)), timeout=10) as client:
        wait_until(lambda: server.statistics().connections_active == 1)
        assert repr(server) == f"<Server serving on {address} connections=1>"
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        try:
            wait_until(lambda: "stopping" in repr(server), what="the stopping state")
            assert repr(server) == f"<Server stopping on {address} connections=1>"
        finally:
            release.set()
        assert recv_until_eof(client) == NOTICE
    stopper.join(10)
    assert repr(server) == f"<Server stopped on {address} connections=0>"


def test_start_or_serve_forever_a_second_time_raises_runtime_error(
    unstarted: Callable[..., Server],
) -> None:
    server = unstarted()
    server.start()
    with pytest.raises(RuntimeError, match="serves once"):
        server.start()
    with pytest.raises(RuntimeError, match="serves once"):
        server.serve_forever()


def test_with_block_stops_a_started_server_and_frees_everything() -> None:
    fds_before = open_fds()
    with Server(echo, "127.0.0.1:0", handle_signals=False) as server:
        server.start()
        port = port_of(server.addresses[0])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"ping")
            assert recv_exactly(client, 4) == b"ping"
        wait_until(lambda: server.statistics().connections_closed == 1)
    assert repr(server).startswith("<Server stopped")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    wait_until(lambda: open_fds() == fds_before, what="descriptors back to baseline")


def test_with_block_around_a_server_never_started_closes_its_listener() -> None:
    fds_before = open_fds()
    with Server(echo, "127.0.0.1:0", handle_signals=False) as server:
        port = port_of(server.addresses[0])
        assert open_fds() > fds_before
    assert open_fds() == fds_before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()


def test_stop_on_a_never_started_server_returns_a_clean_empty_report() -> None:
    fds_before = open_fds()
    server = Server(echo, "127.0.0.1:0", handle_signals=False)
    port = port_of(server.addresses[0])
    report = server.stop()
    assert report == StopReport(clean=True, drained=0, forced=0, stuck_threads=(), duration=0.0)
    assert repr(server).startswith("<Server stopped")
    assert open_fds() == fds_before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    # A stopped server cannot be revived.
    with pytest.raises(RuntimeError):
        server.start()


def test_serve_forever_in_one_thread_stopped_from_another(unstarted: Callable[..., Server]) -> None:
    server = unstarted()
    reports: dict[str, StopReport | None] = {}
    serving = threading.Thread(
        target=lambda: reports.update(serving=server.serve_forever()), name="serving caller"
    )
    serving.start()
    with socket.create_connection(("127.0.0.1", port_of(server.addresses[0])), 10) as client:
        client.sendall(b"hello")
        assert recv_exactly(client, 5) == b"hello"
        stopper = threading.Thread(target=lambda: reports.update(stopper=server.stop()))
        stopper.start()
        assert recv_until_eof(client) == NOTICE
    stopper.join(10)
    serving.join(10)
    assert not serving.is_alive()
    assert reports["serving"] is not None
    assert reports["serving"] is reports["stopper"]
    assert reports["serving"].clean
    assert reports["serving"].drained == 1


def test_serve_function_serves_in_the_calling_thread_until_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # serve() builds its Server inside; catch it on the way to get something to stop.
    built: queue.Queue[Server] = queue.Queue()

    class RecordingServer(Server):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.put(self)

    monkeypatch.setattr(threadserve._server, "Server", RecordingServer)
    returned: list[StopReport] = []
    caller = threading.Thread(
        target=lambda: returned.append(serve(echo, "127.0.0.1:0", handle_signals=False)),
        name="serve caller",
    )
    caller.start()
    server = built.get(timeout=10)
    stopped: list[StopReport | None] = []
    stopper = threading.Thread(target=lambda: stopped.append(server.stop()))
    try:
        with socket.create_connection(("127.0.0.1", port_of(server.addresses[0])), 10) as client:
            client.sendall(b"hi")
            assert recv_exactly(client, 2) == b"hi"
            # No background serving thread, as start() would make: the caller's
            # own thread is the one accepting.
            names = [t.name for t in threading.enumerate()]
            assert f"threadserve server {server.addresses[0]}" not in names
            assert caller.is_alive()
            stopper.start()
            assert recv_until_eof(client) == NOTICE
    finally:
        if stopper.ident is None:
            server.stop()  # Something failed before the stop: still end the caller.
        else:
            stopper.join(10)
        caller.join(10)
    assert not caller.is_alive()
    assert returned == stopped
    assert returned[0].clean


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"grace": -1}, "grace=-1"),
        ({"grace": float("nan")}, "grace=nan"),
        ({"grace": "5"}, "grace='5'"),
        # Infinite waits would overflow select() and poll() deep in the stop.
        ({"grace": float("inf")}, "grace=inf"),
        ({"linger": float("inf")}, "linger=inf"),
        ({"linger": -0.1}, "linger=-0.1"),
        ({"linger": True}, "linger=True"),
        ({"chunk_size": 0}, "chunk_size=0"),
        # Wrong types that used to be found only in a connection thread (a
        # "handler error" on every connection) or at the stop.
        ({"chunk_size": 1.5}, "chunk_size=1.5"),
        ({"chunk_size": True}, "chunk_size=True"),
        ({"timeouts": {"idle": 5}}, "timeouts=.*expected a threadserve.Timeouts"),
        ({"tls": "cert.pem"}, "tls='cert.pem': expected an ssl.SSLContext"),
        ({"goodbye": 123}, "goodbye=123: expected bytes, str or None"),
        ({"notices": "none"}, "notices='none': expected a threadserve.Notices"),
        ({"idle_threads": -1}, "idle_threads=-1"),
        ({"idle_thread_timeout": float("nan")}, "idle_thread_timeout=nan"),
        (
            {"proxy_protocol": "v1", "proxy_allow": "10.0.0.0/8"},
            r"expected a list .*\['10.0.0.0/8'\]",
        ),
        ({"proxy_protocol": "v1", "proxy_timeout": 3e6}, "proxy_timeout=3000000.0"),
    ],
)
def test_bad_server_settings_raise_configuration_error_before_binding(
    settings: dict[str, Any], message: str
) -> None:
    fds_before = open_fds()
    with pytest.raises(ConfigurationError, match=message) as info:
        Server(echo, "127.0.0.1:0", handle_signals=False, **settings)
    assert isinstance(info.value, ValueError)
    assert open_fds() == fds_before


@pytest.mark.parametrize("bind", [8000, b"127.0.0.1:0"])
def test_a_bind_address_that_is_not_text_is_a_configuration_error(bind: object) -> None:
    expected = re.escape("expected an address such as '127.0.0.1:8000'")
    with pytest.raises(ConfigurationError, match=expected):
        Server(echo, bind, handle_signals=False)  # type: ignore[arg-type]


def test_a_handler_that_is_not_callable_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not callable"):
        Server("echo", "127.0.0.1:0", handle_signals=False)  # type: ignore[arg-type]


def _takes_two(conn: Connection, extra: object) -> None:
    pass


def _takes_none() -> None:
    pass


def _supplies_extra(
    handler: Callable[[Connection, object], None],
) -> Callable[[Connection], None]:
    """A decorator as a dependency-injecting library writes it."""

    @functools.wraps(handler)
    def wrapper(conn: Connection) -> None:
        handler(conn, {"db": None})

    return wrapper


def test_a_decorated_handler_is_checked_by_what_is_called_not_what_it_wraps() -> None:
    # The wrapper takes one connection; the function it wraps takes two.
    server = Server(_supplies_extra(_takes_two), "127.0.0.1:0", handle_signals=False)
    server.stop()


def test_values_that_were_accepted_before_the_checks_still_are() -> None:
    server = Server(
        echo,
        "127.0.0.1:0",
        handle_signals=False,
        goodbye=bytearray(b"Bye\n"),  # type: ignore[arg-type]
        timeouts=Timeouts(idle=1.5e6, lifetime=2e6),  # Below poll()'s 24.8 days.
    )
    server.stop()


@pytest.mark.parametrize("handler", [_takes_two, _takes_none])
def test_a_handler_that_cannot_take_one_connection_is_refused_at_once(handler: object) -> None:
    # Before, the server started and every connection failed with a TypeError.
    with pytest.raises(ConfigurationError, match="cannot be called with one connection"):
        Server(handler, "127.0.0.1:0", handle_signals=False)  # type: ignore[arg-type]


# ---------------------------------------------------------------- handler errors


def test_handler_exception_is_logged_with_peer_and_traceback_and_serving_goes_on(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    def fragile(conn: Connection) -> None:
        for chunk in conn:
            if chunk.startswith(b"boom"):
                raise RuntimeError("the handler broke")
            conn.sendall(chunk)

    server = serve(fragile)
    with connect(server.tcp_address) as victim:
        peer = f"127.0.0.1:{victim.getsockname()[1]}"
        victim.sendall(b"boom")
        # The socket is closed cleanly: EOF, not a reset.
        assert recv_until_eof(victim) == b""
    wait_until(lambda: server.statistics().handler_errors == 1)
    # The count comes first, the log line right after it.
    wait_until(lambda: any(r.levelno == logging.ERROR for r in caplog.records), what="the log")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert peer in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], RuntimeError)
    assert "the handler broke" in caplog.text  # The traceback went to the log.

    with connect(server.tcp_address) as next_client:
        next_client.sendall(b"still here")
        assert recv_exactly(next_client, 10) == b"still here"
    assert server.statistics().handler_errors == 1


def test_client_reset_while_the_handler_writes_is_not_an_error(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    block = b"r" * 65536

    def firehose(conn: Connection) -> None:
        for _ in range(2000):  # Bounded: 128 MiB; the reset comes long before.
            conn.sendall(block)

    probe = Probe(firehose)
    server = serve(probe)
    client = connect(server.tcp_address)
    assert recv_exactly(client, 1000) == b"r" * 1000  # The handler is writing now.
    reset(client)
    error = probe.exception()
    assert isinstance(error, (ConnectionResetError, BrokenPipeError))
    wait_until(lambda: server.statistics().connections_closed == 1)
    assert server.statistics().handler_errors == 0
    assert records_at_or_above(caplog, logging.WARNING) == []


def test_client_reset_while_the_handler_reads_is_not_an_error(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe(lambda conn: conn.readexactly(100))
    server = serve(probe)
    client = connect(server.tcp_address)
    client.sendall(b"half a frame")
    wait_until(lambda: server.statistics().bytes_received == 12)
    reset(client)
    assert isinstance(probe.exception(), ConnectionResetError)

    def closed_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "connection closed" in r.getMessage()]

    wait_until(lambda: len(closed_lines()) == 1, what="the connection closed line")
    assert server.statistics().handler_errors == 0
    assert records_at_or_above(caplog, logging.WARNING) == []
    closed = closed_lines()
    assert "reset" in closed[0].lower()


# ---------------------------------------------------------------- cost of idling


def server_thread_cpu(process: psutil.Process, native_ids: set[int]) -> float:
    return sum(t.user_time + t.system_time for t in process.threads() if t.id in native_ids)


def test_an_idle_server_with_idle_connections_uses_no_cpu(serve: ServerFactory) -> None:
    server: RunningServer = serve(echo)
    clients = [connect(server.tcp_address) for _ in range(10)]
    try:
        # A round trip each: every handler has run and is back, blocked in its read.
        for client in clients:
            client.sendall(b".")
            assert recv_exactly(client, 1) == b"."
        threads = [t for t in threading.enumerate() if t.name.startswith("threadserve")]
        # One per connection, plus the server's own (serving, thread spawner).
        assert len([t for t in threads if not t.name.startswith("threadserve server")]) == 10
        native_ids = {t.native_id for t in threads if t.native_id is not None}
        assert len(native_ids) == len(threads) >= 11
        process = psutil.Process()
        assert native_ids <= {t.id for t in process.threads()}
        before = server_thread_cpu(process, native_ids)
        time.sleep(0.5)  # The measurement window itself, not a wait for some state.
        used = server_thread_cpu(process, native_ids) - before
        # Nothing polls on a timer: blocked threads accrue no ticks at all. Allow
        # one 10 ms tick of accounting noise.
        assert used <= 0.011, f"idle server threads used {used:.3f} s of CPU in 0.5 s"
    finally:
        for client in clients:
            client.close()


def test_a_reset_from_the_handlers_own_work_is_a_handler_error(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The same exception means "client gone" only when the connection's own I/O raised it."""

    def database_goes_away(conn: threadserve.Connection) -> None:
        conn.recv(10)
        raise ConnectionResetError(104, "the database connection was reset")

    server = serve(database_goes_away)
    with connect(server.tcp_address) as client:
        client.sendall(b"x")
        assert recv_until_eof(client) == b""
    wait_until(lambda: server.statistics().connections_closed == 1)
    assert server.statistics().handler_errors == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "handler failed" in errors[0].getMessage()


def test_a_client_reset_during_a_write_is_not_a_handler_error(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    wrote = threading.Event()

    def flood_the_client(conn: threadserve.Connection) -> None:
        conn.recv(10)
        wrote.set()
        for _ in range(2000):  # Bounded: 128 MiB; the client's reset breaks the pipe long before.
            conn.sendall(b"x" * 65536)

    server = serve(flood_the_client)
    client = connect(server.tcp_address)
    client.sendall(b"x")
    assert wrote.wait(10)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # Unread data and linger 0: a reset.
    wait_until(lambda: server.statistics().connections_closed == 1)
    assert server.statistics().handler_errors == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
