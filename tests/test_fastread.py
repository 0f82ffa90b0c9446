"""The compiled read (src/threadserve/_fastread.c) and the switch between it and Python.

The module is built by every install on a machine with a C compiler, as CI's
is: a build that failed quietly makes this whole file fail (the import below).
The Connection's own behaviour is tested both ways by running the reading
suites again with THREADSERVE_PURE_PYTHON=1 (tests/pure-python-suites).
"""

from __future__ import annotations

import os
import resource
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from threadserve import ReadTimeout, Timeouts, _accel, _connection
from threadserve._connection import Connection
from threadserve._fastread import poll_recv


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on loopback: (the server's non-blocking end, the client)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=10)
        server, _ = listener.accept()
    server.setblocking(False)
    with server, client:
        yield server, client


@pytest.fixture
def stop_pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def test_the_compiled_read_is_built_and_used_unless_turned_off() -> None:
    turned_off = os.environ.get(_accel.PURE_PYTHON_VARIABLE, "") not in ("", "0")
    assert (_accel.poll_recv is None) == turned_off
    assert _accel.reads() == ("pure Python" if turned_off else "compiled")


@pytest.mark.parametrize(
    ("value", "reads"), [("1", "pure Python"), ("0", "compiled"), ("", "compiled")]
)
def test_the_variable_chooses_the_read(value: str, reads: str) -> None:
    environ = {**os.environ, _accel.PURE_PYTHON_VARIABLE: value}
    done = subprocess.run(
        [sys.executable, "-c", "from threadserve import _accel; print(_accel.reads())"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == reads


class _Index:
    """An integer-like value that is not an int (a numpy length, say)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def test_returns_what_arrived_up_to_bufsize(
    pair: tuple[socket.socket, socket.socket], stop_pipe: tuple[int, int]
) -> None:
    server, client = pair
    client.sendall(b"hello, world")
    assert poll_recv(server.fileno(), stop_pipe[0], 5) == b"hello"
    # As socket.recv, any integer-like size.
    assert poll_recv(server.fileno(), stop_pipe[0], _Index(2)) == b", "
    assert poll_recv(server.fileno(), stop_pipe[0], 100) == b"world"


def test_waits_for_input_then_returns_b_empty_at_end_of_stream(
    pair: tuple[socket.socket, socket.socket], stop_pipe: tuple[int, int]
) -> None:
    server, client = pair
    # The FIN comes from another thread, once this one waits in poll().
    closer = threading.Timer(0.2, client.shutdown, args=(socket.SHUT_WR,))
    closer.start()
    try:
        assert poll_recv(server.fileno(), stop_pipe[0], 100) == b""
    finally:
        closer.join()


@pytest.mark.parametrize("client_sent", [b"", b"late"])
def test_the_stop_reads_nothing_and_says_whether_input_waits(
    pair: tuple[socket.socket, socket.socket], stop_pipe: tuple[int, int], client_sent: bytes
) -> None:
    server, client = pair
    if client_sent:
        client.sendall(client_sent)
        # The bytes are in the server's receive queue before the stop fires.
        select.select([server], [], [], 10)
    os.write(stop_pipe[1], b"x")
    assert poll_recv(server.fileno(), stop_pipe[0], 100) == (1 if client_sent else 0)
    if client_sent:
        # Nothing was taken from the socket: the stop path reads it its own way.
        assert server.recv(100) == client_sent


def test_a_wait_that_times_out_returns_none_having_read_nothing(
    pair: tuple[socket.socket, socket.socket], stop_pipe: tuple[int, int]
) -> None:
    server, client = pair
    began = time.monotonic()
    assert poll_recv(server.fileno(), stop_pipe[0], 100, 50) is None
    assert time.monotonic() - began >= 0.045  # poll() never ends a timed wait early.
    # With input waiting, a timeout changes nothing, whatever its value.
    client.sendall(b"here")
    select.select([server], [], [], 10)
    assert poll_recv(server.fileno(), stop_pipe[0], 2, 0) == b"he"
    assert poll_recv(server.fileno(), stop_pipe[0], 100, 2**40) == b"re"


def test_a_reset_raises_connection_reset_error(
    pair: tuple[socket.socket, socket.socket], stop_pipe: tuple[int, int]
) -> None:
    server, client = pair
    # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    with pytest.raises(ConnectionResetError):
        poll_recv(server.fileno(), stop_pipe[0], 100)


def test_readiness_with_nothing_to_read_returns_none(
    pair: tuple[socket.socket, socket.socket], stop_pipe: tuple[int, int]
) -> None:
    server, client = pair
    # One byte of TCP urgent data: poll() reports POLLPRI, but a plain recv()
    # skips the urgent byte and finds nothing (EAGAIN). The caller waits again.
    client.send(b"!", socket.MSG_OOB)
    assert poll_recv(server.fileno(), stop_pipe[0], 100) is None
    # That first read skipped the urgent byte: the next one waits for data.
    client.sendall(b"after")
    assert poll_recv(server.fileno(), stop_pipe[0], 100) == b"after"


def test_a_closed_descriptor_raises_os_error(stop_pipe: tuple[int, int]) -> None:
    # The highest number allowed, closed: descriptors are given lowest first,
    # so no other thread's socket takes it meanwhile (a low one could).
    soft_limit, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = 4000 if soft_limit == resource.RLIM_INFINITY else min(4000, soft_limit - 1)
    fd = os.dup2(stop_pipe[0], highest)
    os.close(fd)
    with pytest.raises(OSError, match="Bad file descriptor"):
        poll_recv(fd, stop_pipe[0], 100)


Call = tuple[int, int, int, int]


def spy_on_compiled_reads(monkeypatch: pytest.MonkeyPatch, *, even_if_off: bool) -> list[Call]:
    """The calls Connections make to the compiled read from now on, with their arguments.

    Where the compiled read is turned off, it stays off (and the list stays
    empty) unless ``even_if_off``, which puts it in for the test.
    """
    calls: list[Call] = []

    def counting(fd: int, stop_fd: int, bufsize: int, timeout_ms: int) -> bytes | int | None:
        calls.append((fd, stop_fd, bufsize, timeout_ms))
        return poll_recv(fd, stop_fd, bufsize, timeout_ms)

    if even_if_off or vars(_connection)["_poll_recv"] is not None:
        monkeypatch.setattr(_connection, "_poll_recv", counting)
    return calls


def test_the_connection_reads_through_it_unless_turned_off(
    pair: tuple[socket.socket, socket.socket],
    stop_pipe: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, client = pair
    compiled = vars(_connection)["_poll_recv"] is not None
    assert compiled == (_accel.poll_recv is not None)
    calls = spy_on_compiled_reads(monkeypatch, even_if_off=False)
    conn = Connection(server, "client", stop_fd=stop_pipe[0], timeouts=Timeouts())
    client.sendall(b"one line\n")
    assert conn.readline() == b"one line\n"
    client.sendall(b"more")
    assert conn.recv(100) == b"more"
    # No idle timeout and no lifetime: the reads wait without limit (-1).
    fd, stop_fd = server.fileno(), stop_pipe[0]
    expected = [(fd, stop_fd, 65536, -1), (fd, stop_fd, 100, -1)]
    assert calls == (expected if compiled else [])


@pytest.mark.parametrize("timeouts", [Timeouts(idle=30), Timeouts(lifetime=30)])
def test_a_connection_with_an_idle_or_lifetime_deadline_reads_through_it_with_a_timeout(
    pair: tuple[socket.socket, socket.socket],
    stop_pipe: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
    timeouts: Timeouts,
) -> None:
    server, client = pair
    calls = spy_on_compiled_reads(monkeypatch, even_if_off=True)
    conn = Connection(server, "client", stop_fd=stop_pipe[0], timeouts=timeouts)
    client.sendall(b"abcd")
    assert conn.readexactly(4) == b"abcd"
    client.sendall(b"more")
    assert conn.recv(100) == b"more"
    assert [call[:3] for call in calls] == [
        (server.fileno(), stop_pipe[0], 65536),
        (server.fileno(), stop_pipe[0], 100),
    ]
    # Each wait ends at the deadline, rounded up to the next millisecond.
    assert all(25_000 < call[3] <= 30_001 for call in calls)


EACH_PATH = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "pure-python"])


def read_through(monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """Connections made from now on read through the compiled read, or in Python."""
    monkeypatch.setattr(_connection, "_poll_recv", poll_recv if compiled else None)


@EACH_PATH
@pytest.mark.parametrize(
    ("timeouts", "read", "kind"),
    [
        (Timeouts(idle=0.2), "recv", "idle"),
        (Timeouts(idle=0.2), "readline", "idle"),
        (Timeouts(lifetime=0.2), "recv", "lifetime"),
        (Timeouts(read=0.2), "readline", "read"),  # A line begun and never finished.
    ],
    ids=["idle-recv", "idle-readline", "lifetime", "read"],
)
def test_a_timed_read_raises_its_timeout_at_its_deadline_and_not_later(
    pair: tuple[socket.socket, socket.socket],
    stop_pipe: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
    compiled: bool,
    timeouts: Timeouts,
    read: str,
    kind: str,
) -> None:
    server, client = pair
    read_through(monkeypatch, compiled)
    calls = spy_on_compiled_reads(monkeypatch, even_if_off=False)
    began = time.monotonic()
    conn = Connection(server, "client", stop_fd=stop_pipe[0], timeouts=timeouts)
    # The hot path's wait runs out; the general path must then get the same
    # deadline, already passed, and raise. A deadline worked out afresh there
    # would be later than the moment it is handed over, and the read would
    # wait a second timeout.
    handed_over: list[tuple[float | None, float]] = []
    general_path = conn._recv_from_socket

    def spied(bufsize: int, deadline: float | None) -> bytes:
        handed_over.append((deadline, time.monotonic()))
        return general_path(bufsize, deadline)

    monkeypatch.setattr(conn, "_recv_from_socket", spied)
    if kind == "read":
        client.sendall(b"no newline yet")
    with pytest.raises(ReadTimeout) as raised:
        getattr(conn, read)()
    assert raised.value.kind == kind
    assert time.monotonic() - began >= 0.2
    assert len(handed_over) == 1
    deadline, handed_over_at = handed_over[0]
    assert deadline is not None
    assert deadline <= handed_over_at
    if compiled:  # Its last wait was the timed one, of at most the timeout.
        assert 0 < calls[-1][3] <= 201


@EACH_PATH
@pytest.mark.parametrize("arrived", [b"", b"arrived"], ids=["nothing-arrived", "some-arrived"])
def test_the_stop_descriptor_ends_a_timed_read_after_what_had_arrived(
    pair: tuple[socket.socket, socket.socket],
    stop_pipe: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
    compiled: bool,
    arrived: bytes,
) -> None:
    server, client = pair
    read_through(monkeypatch, compiled)
    timeouts = Timeouts(idle=30, lifetime=60)
    conn = Connection(server, "client", stop_fd=stop_pipe[0], timeouts=timeouts)
    if arrived:
        client.sendall(arrived)
        select.select([server], [], [], 10)
    os.write(stop_pipe[1], b"x")
    assert conn.recv(100) == arrived
    client.sendall(b"later")
    assert conn.recv(100) == b""  # Sent after the stop: not read.


def test_a_timeout_beyond_what_poll_takes_waits_without_limit(
    pair: tuple[socket.socket, socket.socket], stop_pipe: tuple[int, int]
) -> None:
    # poll() takes an int of milliseconds: a longer timeout is clamped to the
    # longest, not wrapped round (2**32 + 50 cast to int would be 50 ms).
    server, client = pair
    sender = threading.Timer(0.2, client.sendall, args=(b"late",))
    sender.start()
    try:
        assert poll_recv(server.fileno(), stop_pipe[0], 100, 2**32 + 50) == b"late"
    finally:
        sender.join()


@pytest.mark.parametrize(
    "arguments",
    [(-1, 0, 100), (0, -1, 100), (0, 0, 0), (0, 0, -5), (2**40, 0, 1), (0, 0, 1, 2**70)],
)
def test_bad_arguments_raise_value_or_overflow_error(arguments: tuple[int, ...]) -> None:
    with pytest.raises((ValueError, OverflowError)):
        poll_recv(*arguments)


def test_wrong_argument_count_or_type_raises_type_error() -> None:
    with pytest.raises(TypeError):
        poll_recv(0, 0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        poll_recv(0, 0, 1, -1, 0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        poll_recv(0, 0, 1, 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        poll_recv("0", 0, 1)  # type: ignore[arg-type]
