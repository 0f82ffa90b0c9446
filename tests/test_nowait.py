"""The compiled helper's socket calls (_speedups.c), and the switch back to pure Python.

``make test`` runs the suite with the helper (the default install builds
it) and runs the connection, stop contract and property tests again with
``THREADSERVE_PURE_PYTHON=1``. These tests call the helper directly, so they
check its own promises in either run.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest

from threadserve import _nowait, _speedups

PURE = os.environ.get("THREADSERVE_PURE_PYTHON") == "1"


def test_the_helper_is_in_use_unless_pure_python_is_asked_for() -> None:
    # A missing helper would silently cost the speed it exists for: the
    # default install on this machine (which has a compiler) must have it.
    assert _nowait.COMPILED is (not PURE)


def test_pure_python_is_chosen_by_the_environment() -> None:
    code = "from threadserve import _nowait; print(_nowait.COMPILED, _nowait.send_nowait)"
    env = {**os.environ, "THREADSERVE_PURE_PYTHON": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "None"]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    server.setblocking(False)
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def test_recv_nowait_returns_none_when_nothing_is_queued(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _ = pair
    assert _speedups.recv_nowait(server, 1024) is None


def test_recv_nowait_returns_what_is_queued_up_to_size(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.sendall(b"hello world")
    got = b""
    while len(got) < 11:  # Loopback delivers at once, but take it as a stream.
        server_ready = _wait_readable(server)
        assert server_ready
        chunk = _speedups.recv_nowait(server, 5)
        assert chunk is not None
        assert 0 < len(chunk) <= 5
        got += chunk
    assert got == b"hello world"


def test_recv_nowait_returns_empty_bytes_at_end_of_stream(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.shutdown(socket.SHUT_WR)
    assert _wait_readable(server)
    assert _speedups.recv_nowait(server, 1024) == b""


def test_a_reset_raises_the_builtin_error(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    # SO_LINGER 0: close sends a reset instead of FIN.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    assert _wait_readable(server)
    with pytest.raises(ConnectionResetError):
        _speedups.recv_nowait(server, 1024)


def test_a_closed_socket_fails_with_ebadf_not_another_descriptor(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _client = pair
    number = server.fileno()
    server.close()
    # The number is free again; a new socket may take it. The helper reads
    # the number from the socket object, which now says -1, so it never
    # touches whatever reuses the number.
    other = socket.socket()
    try:
        with pytest.raises(OSError, match="Bad file descriptor") as raised:
            _speedups.send_nowait(server, b"x")
        assert raised.value.errno == errno.EBADF
        with pytest.raises(OSError, match="Bad file descriptor") as raised:
            _speedups.recv_nowait(server, 10)
        assert raised.value.errno == errno.EBADF
        # Whatever took the number (if anything did) got no byte and lost none.
        if other.fileno() == number:
            other.setblocking(False)
            # Not connected: nothing was written to it.
            with pytest.raises(OSError, match="not connected"):
                other.recv(1)
    finally:
        other.close()


def test_send_nowait_sends_and_reports_zero_when_the_buffer_is_full(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    assert _speedups.send_nowait(server, b"ping") == 4
    assert client.recv(4) == b"ping"
    # The client reads nothing now: fill every buffer between the two.
    block = b"x" * 65536
    total = 0
    for _ in range(10_000):  # Bounded: kernel buffers here are a few MiB at most.
        sent = _speedups.send_nowait(server, block)
        if sent == 0:
            break
        total += sent
    else:
        pytest.fail("the send buffer never filled")
    assert total > 0
    # Everything the helper said it sent arrives, in order; nothing else does.
    client.settimeout(10)
    got = bytearray()
    while len(got) < total:
        chunk = client.recv(1 << 20)
        assert chunk
        got += chunk
    assert got == b"x" * total


def test_a_large_send_takes_the_releasing_path_and_still_does_not_wait(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    data = bytes(range(256)) * 4096  # 1 MiB: more than the helper sends holding the GIL
    sent = _speedups.send_nowait(server, memoryview(data))
    assert 0 < sent <= len(data)
    client.settimeout(10)
    reader_got = bytearray()
    while len(reader_got) < sent:
        chunk = client.recv(1 << 20)
        assert chunk
        reader_got += chunk
    assert bytes(reader_got) == data[:sent]


def test_send_nowait_to_a_reset_peer_raises_the_builtin_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    assert _wait_readable(server)
    # The reset has arrived (the socket is readable), so the first send fails.
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        _speedups.send_nowait(server, b"x")


def _wait_readable(sock: socket.socket) -> bool:
    import select

    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(10_000))
