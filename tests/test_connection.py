"""Connection: reads, framing, counters, the cancel token and timeouts, against a real server."""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import pytest
from conftest import ServerFactory
from support import (
    NOTICE,
    SETTLE,
    Probe,
    StopInBackground,
    connect,
    recv_until_eof,
    wait_until,
)

from threadserve import (
    ConfigurationError,
    Connection,
    FrameTooLarge,
    IncompleteRead,
    ReadTimeout,
    Server,
    Timeouts,
    WriteTimeout,
    echo,
)
from threadserve._connection import queued_bytes

TIMED_OUT = b"Timed out\n"
TOO_LARGE = b"Line too long\n"


def send_in_pieces(server: Server, client: socket.socket, pieces: Sequence[bytes]) -> None:
    """Send each piece only once the server has read everything before it.

    That makes every piece a separate read on the server side, which is the
    only way to split a frame across segments deterministically on loopback.
    """
    total = server.statistics().bytes_received
    for piece in pieces:
        client.sendall(piece)
        total += len(piece)
        wait_until_read(server, total)


def wait_until_read(server: Server, total: int) -> None:
    """Wait until the server has read ``total`` bytes in all."""
    wait_until(lambda: server.statistics().bytes_received == total, what=f"{total} bytes read")


def local_port(client: socket.socket) -> int:
    port: int = client.getsockname()[1]
    return port


# ---------------------------------------------------------------- recv, recv_into, iteration


def test_recv_returns_at_most_bufsize_then_empty_bytes_at_client_eof(serve: ServerFactory) -> None:
    def body(conn: Connection) -> list[bytes]:
        pieces = []
        while piece := conn.recv(5):
            pieces.append(piece)
        pieces.append(conn.recv(5))  # Still b"" after the end: EOF is sticky.
        return pieces

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        client.sendall(b"hello, world")
        client.shutdown(socket.SHUT_WR)
        pieces = probe.result()
        assert recv_until_eof(client) == b""
    assert pieces[-1] == b""
    assert b"".join(pieces) == b"hello, world"
    assert all(1 <= len(piece) <= 5 for piece in pieces[:-1])


def test_recv_into_fills_the_buffer_honours_nbytes_and_returns_zero_at_eof(
    serve: ServerFactory,
) -> None:
    def body(conn: Connection) -> tuple[bytes, bytes, list[bytes]]:
        buffer = bytearray(4)
        count = conn.recv_into(buffer)
        first = bytes(buffer[:count])
        view = memoryview(bytearray(10))
        count = conn.recv_into(view, 2)
        second = bytes(view[:count])
        rest = []
        while count := conn.recv_into(buffer):
            rest.append(bytes(buffer[:count]))
        return first, second, rest

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        send_in_pieces(server, client, [b"abcdef"])
        client.sendall(b"ghij")
        client.shutdown(socket.SHUT_WR)
        first, second, rest = probe.result()
    assert first == b"abcd"
    assert second == b"ef"
    assert b"".join(rest) == b"ghij"


def test_recv_into_takes_unread_bytes_first(serve: ServerFactory) -> None:
    def body(conn: Connection) -> tuple[bytes, bytes]:
        conn.unread(b"XYZ")
        buffer = bytearray(2)
        count = conn.recv_into(buffer)
        first = bytes(buffer[:count])
        return first, conn.recv(10)

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address):
        # Nothing sent: both reads are served from the pushed-back bytes alone.
        assert probe.result() == (b"XY", b"Z")


def test_iteration_yields_each_chunk_and_ends_at_client_eof(serve: ServerFactory) -> None:
    probe = Probe(lambda conn: list(conn))
    server = serve(probe)
    with connect(server.tcp_address) as client:
        send_in_pieces(server, client, [b"a", b"bb", b"ccc"])
        client.shutdown(socket.SHUT_WR)
        assert probe.result() == [b"a", b"bb", b"ccc"]
        assert recv_until_eof(client) == b""


def test_iteration_ends_at_stop_after_yielding_what_had_arrived(serve: ServerFactory) -> None:
    def body(conn: Connection) -> tuple[list[bytes], bool]:
        chunks = list(conn)
        return chunks, conn.cancel_token.wait(10)

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        send_in_pieces(server, client, [b"abc"])
        stopping = StopInBackground(server)
        assert recv_until_eof(client) == NOTICE
    assert probe.result() == ([b"abc"], True)
    assert stopping.join().clean


class Flagged(NamedTuple):
    """A Connection whose stop descriptor never fires, its client, and its "stop begun" flag."""

    conn: Connection
    client: socket.socket
    stop_begun: threading.Event


@pytest.fixture(
    # Without deadlines, and with them: a read with an idle or lifetime
    # deadline waits with a timeout, and must see the stop the same way.
    params=[Timeouts(), Timeouts(idle=30, lifetime=60)],
    ids=["no-deadline", "deadlines"],
)
def flagged(request: pytest.FixtureRequest) -> Iterator[Flagged]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        sock, _address = listener.accept()
    sock.setblocking(False)
    never_fired = os.eventfd(0)
    stop_begun = threading.Event()
    conn = Connection(
        sock, "client", stop_fd=never_fired, timeouts=request.param, stop_begun=stop_begun
    )
    try:
        yield Flagged(conn, client, stop_begun)
    finally:
        client.close()
        conn._close_socket()
        os.close(never_fired)


EACH_READ = pytest.mark.parametrize(
    "read",
    [lambda conn: conn.recv(100), lambda conn: conn.readline()],
    ids=["recv", "readline"],
)


@EACH_READ
def test_a_busy_connection_sees_the_stop_begin_without_its_stop_descriptor(
    read: Callable[[Connection], bytes], flagged: Flagged
) -> None:
    # The stop wakes idle connections a group at a time through their stop
    # descriptors. A busy connection finds its socket readable and never waits
    # on its descriptor, so the server-wide "stop begun" flag is how it learns
    # of the stop at its next read, instead of serving on until its group's turn.
    conn, client, stop_begun = flagged
    client.sendall(b"before\n")
    assert read(conn) == b"before\n"
    client.sendall(b"arrived\n")
    wait_until(lambda: queued_bytes(conn._fd) == len(b"arrived\n"))
    stop_begun.set()
    assert read(conn) == b"arrived\n"  # Had arrived when the stop began: answered.
    client.sendall(b"later\n")
    assert read(conn) == b""  # Then end of stream, though "later" is readable.


def _waiting_in_poll(native_id: int) -> bool:
    """True while the thread is blocked in poll() (Linux: its wait channel says so)."""
    with open(f"/proc/self/task/{native_id}/wchan") as wchan:
        return "poll" in wchan.read()


@EACH_READ
def test_a_stop_that_begins_while_a_read_waits_ends_reading_after_what_had_arrived(
    read: Callable[[Connection], bytes], flagged: Flagged
) -> None:
    # As above, but the flag is set while the read is already blocked in its
    # wait: the read that returns must still know the stop has begun (the
    # compiled read once checked the flag only before its wait, and went on
    # answering what the client sent after the stop).
    conn, client, stop_begun = flagged
    results: queue.Queue[bytes] = queue.Queue()
    reader_id: queue.Queue[int] = queue.Queue()

    def reader() -> None:
        reader_id.put(threading.get_native_id())
        results.put(read(conn))
        results.put(read(conn))

    thread = threading.Thread(target=reader, daemon=True)
    try:
        thread.start()
        native_id = reader_id.get(timeout=10)
        wait_until(lambda: _waiting_in_poll(native_id), what="the read to wait in poll")
        stop_begun.set()
        client.sendall(b"arrived\n")
        assert results.get(timeout=10) == b"arrived\n"  # Arrived during the wait: answered.
        client.sendall(b"later\n")
        assert results.get(timeout=10) == b""  # Sent after the stop began: not read.
    finally:
        client.close()  # Wakes the reader if an assertion left it waiting.
        thread.join(timeout=10)
    assert not thread.is_alive()


# ---------------------------------------------------------------- readline


def test_readline_assembles_lines_split_across_many_segments(serve: ServerFactory) -> None:
    probe = Probe(lambda conn: [conn.readline(), conn.readline()])
    server = serve(probe)
    with connect(server.tcp_address) as client:
        send_in_pieces(server, client, [b"he", b"l", b"lo wo", b"rld\nsec", b"o", b"nd\n"])
        assert probe.result() == [b"hello world\n", b"second\n"]


def test_readline_returns_several_lines_from_one_segment_one_at_a_time(
    serve: ServerFactory,
) -> None:
    def body(conn: Connection) -> list[tuple[bytes, int]]:
        # (line, bytes read from the socket so far): all lines came in one read.
        return [(conn.readline(), conn.bytes_received) for _ in range(4)]

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        client.sendall(b"a\nbb\n\nccc\n")
        lines = probe.result()
    assert [line for line, _ in lines] == [b"a\n", b"bb\n", b"\n", b"ccc\n"]
    # The last line needed no further read: it was already buffered.
    assert lines[-1][1] == lines[0][1]


def test_readline_returns_the_last_unterminated_line_at_eof_then_empty_bytes(
    serve: ServerFactory,
) -> None:
    probe = Probe(lambda conn: [conn.readline(), conn.readline(), conn.readline()])
    server = serve(probe)
    with connect(server.tcp_address) as client:
        client.sendall(b"one\ntwo")
        client.shutdown(socket.SHUT_WR)
        assert probe.result() == [b"one\n", b"two", b""]


def test_readline_accepts_a_line_of_exactly_limit_bytes_newline_included(
    serve: ServerFactory,
) -> None:
    def body(conn: Connection) -> tuple[bytes, FrameTooLarge]:
        line = conn.readline(limit=8)
        with pytest.raises(FrameTooLarge) as info:
            conn.readline(limit=8)
        return line, info.value

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        client.sendall(b"1234567\n12345678\n")
        line, error = probe.result()
    assert line == b"1234567\n"
    assert error.limit == 8


def test_readline_rejects_an_overlong_line_after_reading_at_most_limit_plus_one_chunk(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    limit, chunk_size = 4096, 1024
    read_when_rejected: list[int] = []

    def body(conn: Connection) -> bytes:
        try:
            return conn.readline(limit=limit)
        except FrameTooLarge:
            read_when_rejected.append(conn.bytes_received)
            raise

    probe = Probe(body)
    server = serve(probe, chunk_size=chunk_size)
    with connect(server.tcp_address) as client:
        # Far more than the limit and no newline: the server must give up early.
        client.sendall(b"x" * (64 * 1024))
        error = probe.exception()
        assert recv_until_eof(client) == TOO_LARGE
    assert isinstance(error, FrameTooLarge)
    assert isinstance(error, ValueError)
    assert error.limit == limit
    assert limit < read_when_rejected[0] <= limit + chunk_size
    # A client sending garbage is not a server error.
    assert server.statistics().handler_errors == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------- readexactly and unread


def test_readexactly_assembles_frames_split_across_segments(serve: ServerFactory) -> None:
    def body(conn: Connection) -> list[bytes]:
        frames = []
        for _ in range(3):
            (size,) = struct.unpack(">I", conn.readexactly(4))
            frames.append(conn.readexactly(size, limit=1024))
        return frames

    probe = Probe(body)
    server = serve(probe)
    stream = b"".join(struct.pack(">I", len(p)) + p for p in [b"0123456789", b"", b"xyz"])
    with connect(server.tcp_address) as client:
        # Cuts inside the first header, inside the first payload, and across frames.
        send_in_pieces(server, client, [stream[:2], stream[2:7], stream[7:16], stream[16:]])
        assert probe.result() == [b"0123456789", b"", b"xyz"]


def test_readexactly_at_eof_raises_incomplete_read_carrying_the_partial_bytes(
    serve: ServerFactory,
) -> None:
    probe = Probe(lambda conn: conn.readexactly(10))
    server = serve(probe)
    with connect(server.tcp_address) as client:
        client.sendall(b"12345")
        client.shutdown(socket.SHUT_WR)
        error = probe.exception()
        assert recv_until_eof(client) == b""
    assert isinstance(error, IncompleteRead)
    assert isinstance(error, EOFError)
    assert error.partial == b"12345"
    assert error.expected == 10
    assert server.statistics().handler_errors == 0


def test_readexactly_at_stop_gives_the_partial_frame_so_the_handler_can_answer_it(
    serve: ServerFactory,
) -> None:
    def body(conn: Connection) -> bytes:
        try:
            return conn.readexactly(10)
        except IncompleteRead as exc:
            conn.sendall(b"partial:" + exc.partial)
            return exc.partial

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        send_in_pieces(server, client, [b"abc"])
        stopping = StopInBackground(server)
        assert recv_until_eof(client) == b"partial:abc" + NOTICE
    assert probe.result() == b"abc"
    assert stopping.join().clean


def test_readexactly_rejects_a_size_over_limit_before_reading_anything(
    serve: ServerFactory,
) -> None:
    data_waiting = threading.Event()

    def body(conn: Connection) -> tuple[int, bytes, bytes]:
        data_waiting.wait(10)
        with pytest.raises(FrameTooLarge):
            conn.readexactly(1_000_000, limit=100)
        read_when_rejected = conn.bytes_received
        with pytest.raises(ValueError, match="n must be >= 0"):
            conn.readexactly(-1)
        return read_when_rejected, conn.readexactly(0), conn.readexactly(5)

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        client.sendall(b"12345")  # Waiting in the socket when the frame size is refused.
        data_waiting.set()
        assert probe.result() == (0, b"", b"12345")


def test_unread_bytes_come_back_first_and_are_not_counted_twice(serve: ServerFactory) -> None:
    def body(conn: Connection) -> tuple[bytes, bytes, int]:
        head = conn.recv(3)  # Sniff the protocol, then hand the bytes back.
        conn.unread(head)
        return head, conn.readline(), conn.bytes_received

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        send_in_pieces(server, client, [b"GET", b" /\n"])
        assert probe.result() == (b"GET", b"GET /\n", 6)


def test_iterating_gives_unread_bytes_first_then_the_stream(serve: ServerFactory) -> None:
    line_read = threading.Event()

    def body(conn: Connection) -> tuple[list[bytes], int]:
        line = conn.readline()  # Leaves what followed the line in the buffer.
        conn.unread(line)
        line_read.set()
        return list(conn), conn.bytes_received

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        client.sendall(b"one\ntwo")  # One segment: readline takes both parts.
        assert line_read.wait(SETTLE)
        client.sendall(b"three")  # Read from the socket once the buffer is handed out.
        client.shutdown(socket.SHUT_WR)
        chunks, received = probe.result()
    assert chunks == [b"one\ntwo", b"three"]
    assert received == len(b"one\ntwothree")


# ---------------------------------------------------------------- addresses, counters, repr


@pytest.mark.parametrize(
    ("bind", "host", "peer_format"),
    [("127.0.0.1:0", "127.0.0.1", "127.0.0.1:{}"), ("[::1]:0", "::1", "[::1]:{}")],
)
def test_peer_and_local_address_are_written_like_bind_addresses(
    serve: ServerFactory, bind: str, host: str, peer_format: str
) -> None:
    probe = Probe(lambda conn: (conn.peer, conn.local_address))
    server = serve(probe, bind=bind)
    assert server.tcp_address[0] == host
    with connect(server.tcp_address) as client:
        port = local_port(client)
        peer, local = probe.result()
    assert peer == peer_format.format(port)
    assert local == server.addresses[0]


def test_byte_counters_count_what_the_handler_read_and_wrote(serve: ServerFactory) -> None:
    def body(conn: Connection) -> tuple[int, int]:
        for chunk in conn:
            conn.sendall(chunk + chunk)  # Twice as much out as in.
        return conn.bytes_received, conn.bytes_sent

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        send_in_pieces(server, client, [b"x" * 100, b"y" * 1000, b"z" * 10])
        client.shutdown(socket.SHUT_WR)
        assert len(recv_until_eof(client)) == 2220
        assert probe.result() == (1110, 2220)
    wait_until(lambda: server.statistics().connections_closed == 1)
    stats = server.statistics()
    assert (stats.bytes_received, stats.bytes_sent) == (1110, 2220)


def test_repr_shows_peer_state_and_byte_counts(serve: ServerFactory) -> None:
    def body(conn: Connection) -> tuple[str, str]:
        before = repr(conn)
        conn.sendall(conn.recv(100))
        conn.cancel_token.wait(10)
        return before, repr(conn)

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        port = local_port(client)
        client.sendall(b"hello")
        wait_until(lambda: server.statistics().bytes_sent == 5)
        stopping = StopInBackground(server)
        assert recv_until_eof(client) == b"hello" + NOTICE
    stopping.join()
    before, after = probe.result()
    assert before == f"<Connection 127.0.0.1:{port} open in=0 out=0>"
    assert after == f"<Connection 127.0.0.1:{port} cancelled in=5 out=5>"


# ---------------------------------------------------------------- cancel token


def test_cancelled_is_false_while_serving_and_true_with_a_reason_at_stop(
    serve: ServerFactory,
) -> None:
    started = threading.Event()

    def body(conn: Connection) -> tuple[bool, bool, bool, str | None]:
        before = conn.cancelled
        started.set()
        waited = conn.cancel_token.wait(10)
        return before, waited, conn.cancelled, conn.cancel_token.reason

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        assert started.wait(10)
        stopping = StopInBackground(server)
        assert recv_until_eof(client) == NOTICE
    assert probe.result() == (False, True, True, "server stopping")
    assert stopping.join().clean


def test_on_cancel_callback_runs_at_stop_and_can_interrupt_blocking_work(
    serve: ServerFactory,
) -> None:
    ready = threading.Event()

    def body(conn: Connection) -> object:
        work: queue.Queue[object] = queue.Queue()
        conn.on_cancel(lambda: work.put("interrupted"))
        ready.set()
        return work.get(timeout=10)  # Stands for any blocking call that is not a read.

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        assert ready.wait(10)
        stopping = StopInBackground(server)
        assert recv_until_eof(client) == NOTICE
    assert probe.result() == "interrupted"
    assert stopping.join().clean


def test_on_cancel_after_the_cancel_runs_at_once_in_the_registering_thread(
    serve: ServerFactory,
) -> None:
    def body(conn: Connection) -> tuple[list[str], list[str]]:
        conn.cancel_token.wait(10)
        ran_in: list[str] = []
        conn.on_cancel(lambda: ran_in.append(threading.current_thread().name))
        immediately = list(ran_in)  # Copied before anything else could append.
        return immediately, [threading.current_thread().name]

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        wait_until(lambda: server.statistics().connections_active == 1)
        stopping = StopInBackground(server)
        assert recv_until_eof(client) == NOTICE
    ran_in, handler_thread = probe.result()
    assert ran_in == handler_thread
    stopping.join()


def test_unregistered_cancel_callback_does_not_run(serve: ServerFactory) -> None:
    registered = threading.Event()

    def body(conn: Connection) -> list[str]:
        calls: list[str] = []
        kept_ran = threading.Event()
        unregister = conn.on_cancel(lambda: calls.append("removed"))
        conn.on_cancel(lambda: calls.append("kept"))
        conn.on_cancel(kept_ran.set)
        unregister()
        unregister()  # Twice is harmless.
        registered.set()
        # The token is set before its callbacks run: wait for the last one, not the token.
        kept_ran.wait(10)
        return calls

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        # Registered before the stop: after it, on_cancel would run each callback at once.
        assert registered.wait(10)
        stopping = StopInBackground(server)
        assert recv_until_eof(client) == NOTICE
    assert probe.result() == ["kept"]
    stopping.join()


def test_raising_cancel_callback_is_logged_and_does_not_stop_the_stop(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    ready = threading.Event()

    def broken_hook() -> None:
        raise RuntimeError("hook failed")

    def body(conn: Connection) -> bool:
        later_hook_ran = threading.Event()
        conn.on_cancel(broken_hook)
        conn.on_cancel(later_hook_ran.set)
        ready.set()
        return later_hook_ran.wait(10)

    probe = Probe(body)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        assert ready.wait(10)
        stopping = StopInBackground(server)
        assert recv_until_eof(client) == NOTICE
    assert probe.result() is True
    assert stopping.join().clean
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "cancel callback" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], RuntimeError)


# ---------------------------------------------------------------- timeouts


def read_until_eof_timed(client: socket.socket, timeout: float = 10.0) -> tuple[bytes, float]:
    """Everything until EOF, and how long it took (bounded by the socket timeout)."""
    client.settimeout(timeout)
    started = time.monotonic()
    data = recv_until_eof(client)
    return data, time.monotonic() - started


def read_for(client: socket.socket, seconds: float, into: bytearray) -> bool:
    """Collect what arrives for ``seconds`` (this paces the client); True at EOF."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([client], [], [], remaining)
        if readable:
            chunk = client.recv(65536)
            if not chunk:
                return True
            into += chunk
    return False


def no_warnings_or_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_idle_timeout_raises_read_timeout_and_closes_with_the_timed_out_notice(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    idle = 0.3
    probe = Probe(lambda conn: list(conn))
    server = serve(probe, timeouts=Timeouts(idle=idle))
    with connect(server.tcp_address) as client:
        data, elapsed = read_until_eof_timed(client)
    assert data == TIMED_OUT
    assert idle * 0.9 <= elapsed < idle + 2.0
    error = probe.exception()
    assert isinstance(error, ReadTimeout)
    assert isinstance(error, TimeoutError)

    def closed_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "connection closed" in r.getMessage()]

    wait_until(lambda: len(closed_lines()) == 1, what="the connection closed line")
    assert server.statistics().handler_errors == 0
    # A client going quiet is routine: no warning, no error, no traceback.
    assert no_warnings_or_errors(caplog) == []
    closed = closed_lines()
    assert len(closed) == 1
    assert "no data from 127.0.0.1:" in closed[0].getMessage()
    assert "for 0.3 s" in closed[0].getMessage()
    assert error.kind == "idle"
    assert closed[0].levelno <= logging.INFO


def test_traffic_within_the_idle_timeout_keeps_the_connection_open(serve: ServerFactory) -> None:
    # 1.5 s of traffic, longer than the idle limit, each gap a twelfth of it.
    idle, interval, count = 1.2, 0.1, 15
    server = serve(echo, timeouts=Timeouts(idle=idle))
    with connect(server.tcp_address) as client:
        for index in range(count):
            client.sendall(b"%d," % index)
            time.sleep(interval)  # Pacing the client, not waiting for server state.
        client.shutdown(socket.SHUT_WR)
        echoed = recv_until_eof(client)
    assert echoed == b"".join(b"%d," % index for index in range(count))


def test_read_deadline_cuts_off_a_client_trickling_one_line(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Every byte arrives well within the idle timeout; only the frame deadline can end this.
    idle, read, interval = 2.0, 0.5, 0.1
    probe = Probe(lambda conn: conn.readline())
    server = serve(probe, timeouts=Timeouts(idle=idle, read=read))
    with connect(server.tcp_address) as client:
        started = time.monotonic()
        for _ in range(60):  # At most 6 s of trickling.
            client.sendall(b"x")
            readable, _, _ = select.select([client], [], [], interval)
            if readable:
                break
        cut_after = time.monotonic() - started
        assert recv_until_eof(client) == TIMED_OUT
    assert read * 0.9 <= cut_after < read + 2.0
    assert isinstance(probe.exception(), ReadTimeout)
    assert no_warnings_or_errors(caplog) == []


def test_write_timeout_when_the_client_never_reads(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    write = 0.3
    block = b"w" * 65536

    def body(conn: Connection) -> int:
        for _ in range(2000):  # Bounded: 128 MiB, far beyond any socket buffers here.
            conn.sendall(block)
        return conn.bytes_sent

    probe = Probe(body)
    server = serve(probe, timeouts=Timeouts(write=write))
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(server.tcp_address)
        started = time.monotonic()
        error = probe.exception(timeout=20)
        elapsed = time.monotonic() - started
    assert isinstance(error, WriteTimeout)
    assert isinstance(error, TimeoutError)
    assert write <= elapsed < write + 5.0
    wait_until(lambda: server.statistics().connections_closed == 1)
    assert server.statistics().handler_errors == 0
    assert no_warnings_or_errors(caplog) == []


def test_lifetime_ends_a_connection_that_is_never_idle(serve: ServerFactory) -> None:
    lifetime = 0.6
    server = serve(echo, timeouts=Timeouts(lifetime=lifetime))
    received = bytearray()
    with connect(server.tcp_address) as client:
        started = time.monotonic()
        eof = False
        for _ in range(100):  # A byte every 0.1 s, at most ~10 s; the lifetime ends it sooner.
            client.sendall(b"x")
            eof = read_for(client, 0.1, received)
            if eof:
                break
        ended_after = time.monotonic() - started
    assert eof
    assert received.endswith(TIMED_OUT)
    assert set(received[: -len(TIMED_OUT)]) == {ord("x")}
    assert lifetime * 0.9 <= ended_after < lifetime + 2.0


@pytest.mark.parametrize("field", ["idle", "read", "write", "handshake", "lifetime"])
# 3e6 s: above what poll() can wait (2**31 - 1 ms), every read failed with OverflowError.
@pytest.mark.parametrize("value", [0, -1, -0.5, float("nan"), float("inf"), 3e6, True, "1"])
def test_bad_timeout_values_raise_configuration_error_naming_the_field(
    field: str, value: object
) -> None:
    with pytest.raises(ConfigurationError, match=f"timeout {field}=") as info:
        Timeouts(**{field: value})  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_a_read_timeout_subclass_has_a_kind_even_without_calling_its_parents_init() -> None:
    class HandlerTimeout(ReadTimeout):
        def __init__(self) -> None:
            Exception.__init__(self, "from the handler")

    assert HandlerTimeout().kind == "read"


def test_good_timeout_values_are_kept() -> None:
    timeouts = Timeouts(idle=1, read=0.25, write=None, handshake=3.5, lifetime=None)
    assert (timeouts.idle, timeouts.read, timeouts.write) == (1, 0.25, None)
    assert (timeouts.handshake, timeouts.lifetime) == (3.5, None)
