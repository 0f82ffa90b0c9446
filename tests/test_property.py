"""Properties over random chunkings: framing is exact, and a stop loses no byte that was read."""

from __future__ import annotations

import contextlib
import itertools
import queue
import random
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import NOTICE, recv_until_eof, wait_until

from threadserve import Connection, IncompleteRead, Server, StopReport, echo

T = TypeVar("T")

# Each example runs a real server and real sockets: a moderate count, no deadline
# (a noisy machine must not turn a slow example into a failure). The autouse
# fixtures from conftest only check what is left once the whole test is over.
EXAMPLES = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: How the server reads: byte by byte (slow, so only for small streams) up to its default.
SERVER_CHUNK_SIZES = st.sampled_from([1, 7, 1024, 65536])


@contextlib.contextmanager
def server_for_one_example(
    handler: Callable[[Connection], object], **options: object
) -> Iterator[Server]:
    server = Server(handler, "127.0.0.1:0", handle_signals=False, **options)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        if not server.stopping:  # Once only: a second stop() writes to a closed pipe.
            server.stop()


def address_of(server: Server) -> tuple[str, int]:
    host, _, port = server.addresses[0].rpartition(":")
    return host, int(port)


def wait_until_read(server: Server, total: int) -> None:
    wait_until(lambda: server.statistics().bytes_received == total, what=f"{total} bytes read")


def send_pieces(
    server: Server, client: socket.socket, pieces: Sequence[bytes], settle: Sequence[bool]
) -> None:
    """Send the pieces in order; after those marked in ``settle``, wait until the server read all.

    Waiting makes that piece end a separate read on the server (a segment
    boundary it must cope with); not waiting lets the kernel coalesce pieces.
    """
    total = 0
    for piece, wait in zip(pieces, settle, strict=True):
        client.sendall(piece)
        total += len(piece)
        if wait:
            wait_until_read(server, total)


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds) if end > start]


class Outcome:
    """What a handler returned, collected in the test thread."""

    def __init__(self) -> None:
        self._values: queue.Queue[object] = queue.Queue()

    def put(self, value: object) -> None:
        self._values.put(value)

    def get(self) -> object:
        return self._values.get(timeout=10)


# ---------------------------------------------------------------- framing


@st.composite
def chunked_lines(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], list[bool], int]:
    """Lines (the last maybe unterminated), the stream cut anywhere, how to send it."""
    bodies = draw(
        st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), max_size=12)
    )
    lines = [body + b"\n" for body in bodies]
    tail = draw(st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")))
    if tail:
        lines.append(tail)
    stream = b"".join(lines)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=20))
    pieces = split_at(stream, cuts)
    settle = draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces)))
    return lines, pieces, settle, draw(SERVER_CHUNK_SIZES)


@EXAMPLES
@given(chunked_lines())
def test_readline_returns_exactly_the_lines_sent_however_they_are_cut(
    case: tuple[list[bytes], list[bytes], list[bool], int],
) -> None:
    lines, pieces, settle, chunk_size = case
    outcome = Outcome()

    def read_lines(conn: Connection) -> None:
        got = []
        while line := conn.readline(limit=1024):
            got.append(line)
        outcome.put(got)

    with (
        server_for_one_example(read_lines, chunk_size=chunk_size) as server,
        socket.create_connection(address_of(server), timeout=10) as client,
    ):
        send_pieces(server, client, pieces, settle)
        client.shutdown(socket.SHUT_WR)
        assert outcome.get() == lines
        assert recv_until_eof(client) == b""


@st.composite
def chunked_frames(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], list[bool], int]:
    """Length-prefixed frames, the stream cut anywhere, how to send it."""
    frames = draw(st.lists(st.binary(max_size=2000), max_size=10))
    stream = b"".join(struct.pack(">H", len(frame)) + frame for frame in frames)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=20))
    pieces = split_at(stream, cuts)
    settle = draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces)))
    return frames, pieces, settle, draw(SERVER_CHUNK_SIZES)


@EXAMPLES
@given(chunked_frames())
def test_readexactly_returns_exactly_the_frames_sent_however_they_are_cut(
    case: tuple[list[bytes], list[bytes], list[bool], int],
) -> None:
    frames, pieces, settle, chunk_size = case
    outcome = Outcome()

    def read_frames(conn: Connection) -> None:
        got: list[bytes] = []
        while True:
            try:
                header = conn.readexactly(2)
            except IncompleteRead as exc:
                outcome.put((got, exc.partial))  # A clean end leaves nothing partial.
                return
            (size,) = struct.unpack(">H", header)
            got.append(conn.readexactly(size, limit=2000))

    with (
        server_for_one_example(read_frames, chunk_size=chunk_size) as server,
        socket.create_connection(address_of(server), timeout=10) as client,
    ):
        send_pieces(server, client, pieces, settle)
        client.shutdown(socket.SHUT_WR)
        assert outcome.get() == (frames, b"")
        assert recv_until_eof(client) == b""


# ---------------------------------------------------------------- stopping


@dataclass(frozen=True)
class StopCase:
    """A stream as chunk sizes (bytes from a seed keep failure reports short), and its stop."""

    sizes: tuple[int, ...]
    seed: int
    stop_after: int  # The stop comes after this many chunks were sent.
    settle: tuple[bool, ...]  # Before the stop: wait for the server to read this chunk?
    settle_before_stop: bool  # Wait for the server to read everything before stopping?
    chunk_size: int  # The server's read size.

    def chunks(self) -> list[bytes]:
        # Random bytes: a lost, doubled or reordered run of bytes cannot go unnoticed.
        rng = random.Random(self.seed)
        return [rng.randbytes(size) for size in self.sizes]


@st.composite
def stop_cases(draw: st.DrawFn) -> StopCase:
    sizes = tuple(draw(st.lists(st.integers(1, 40_000), min_size=1, max_size=8)))
    stop_after = draw(st.integers(0, len(sizes)))
    # Byte-by-byte reads only for small streams: they cost a system call a byte.
    read_sizes = SERVER_CHUNK_SIZES if sum(sizes) <= 20_000 else st.sampled_from([7, 1024, 65536])
    return StopCase(
        sizes=sizes,
        seed=draw(st.integers(0, 2**32 - 1)),
        stop_after=stop_after,
        settle=tuple(draw(st.lists(st.booleans(), min_size=stop_after, max_size=stop_after))),
        settle_before_stop=draw(st.booleans()),
        chunk_size=draw(read_sizes),
    )


class Reader:
    """Read a socket until EOF in a thread, so the client can keep writing meanwhile."""

    def __init__(self, sock: socket.socket) -> None:
        self.data = bytearray()
        self.error: OSError | None = None
        self._sock = sock
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        try:
            while chunk := self._sock.recv(65536):
                self.data += chunk
        except OSError as exc:
            self.error = exc

    def join(self) -> bytes:
        self._thread.join(30)
        assert not self._thread.is_alive(), "no EOF from the server"
        assert self.error is None, f"the client read failed: {self.error!r}"
        return bytes(self.data)


@EXAMPLES
@given(stop_cases())
def test_a_stop_anywhere_answers_exactly_the_prefix_that_was_read_then_the_notice(
    case: StopCase,
) -> None:
    chunks = case.chunks()
    stop_after, settle, chunk_size = case.stop_after, case.settle, case.chunk_size
    settle_before_stop = case.settle_before_stop
    reports: list[StopReport | None] = []
    with server_for_one_example(echo, chunk_size=chunk_size, grace=10.0) as server:
        stopper = threading.Thread(target=lambda: reports.append(server.stop()))
        with socket.create_connection(address_of(server), timeout=10) as client:
            # Accepted first: a client still in the listen queue when the listener
            # closes is reset, which the stop contract allows (it was never served).
            wait_until(lambda: server.statistics().connections_active == 1, what="the accept")
            reader = Reader(client)
            sent = bytearray()
            for index, chunk in enumerate(chunks[:stop_after]):
                client.sendall(chunk)
                sent += chunk
                if settle[index]:
                    wait_until_read(server, len(sent))
            if settle_before_stop:
                wait_until_read(server, len(sent))
            read_before_stop = server.statistics().bytes_received
            stopper.start()
            # The rest goes out while the server stops: some of it may be read
            # (and must then be answered), the rest is discarded. The client
            # sends no EOF: the notice must come from the stop, not from an end
            # of stream.
            for chunk in chunks[stop_after:]:
                try:
                    client.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break  # Only after the server closed: nothing more can be read anyway.
                sent += chunk
            received = reader.join()
        stopper.join(30)
    read = server.statistics().bytes_received
    assert read_before_stop <= read <= len(sent)
    if settle_before_stop:
        assert read >= sum(len(chunk) for chunk in chunks[:stop_after])
    assert received == bytes(sent[:read]) + NOTICE
    assert len(reports) == 1
    assert reports[0] is not None
    assert reports[0].clean
