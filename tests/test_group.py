"""Connections that talk to each other: sendall from any thread, groups, slow consumers."""

from __future__ import annotations

import errno
import functools
import queue
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from conftest import ServerFactory
from support import NOTICE, SETTLE, Probe, connect, recv_exactly, recv_until_eof, wait_until

from threadserve import Connection, ConnectionClosed, Group, ThreadserveError, Timeouts
from threadserve._outbox import flusher
from threadserve._writelock import WriteLock

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _flusher_ends() -> Iterator[None]:
    """The flusher thread ends once no socket is full: after each test, it must have."""
    yield
    wait_until(lambda: not flusher.running(), what="the flusher thread to end")


def line_reader(sock: socket.socket) -> Iterator[bytes]:
    """Lines from ``sock`` until EOF (a last unterminated piece included)."""
    buffer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            if buffer:
                yield buffer
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line + b"\n"


class Reader:
    """A client socket read by its own thread into a list of lines, until EOF or an error."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines: list[bytes] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for line in line_reader(self.sock):
                self.lines.append(line)
        except OSError as exc:
            self.error = exc

    def has(self, count: int) -> bool:
        return len(self.lines) >= count

    def join(self) -> None:
        self._thread.join(SETTLE)
        assert not self._thread.is_alive(), "reader still reading"


# ---------------------------------------------------------------- the write lock


def test_write_lock_excludes_and_wakes_every_waiter() -> None:
    lock = WriteLock()
    inside = 0
    most_inside = 0
    counter = 0

    def worker() -> None:
        nonlocal inside, most_inside, counter
        for _ in range(2000):
            lock.acquire()
            try:
                inside += 1
                most_inside = max(most_inside, inside)
                counter += 1
                inside -= 1
            finally:
                lock.release()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SETTLE)
    assert not any(thread.is_alive() for thread in threads), "a waiter was never woken"
    assert most_inside == 1
    assert counter == 8 * 2000
    assert not lock.locked()
    assert lock.waiters == 0


def test_write_lock_try_and_timeout() -> None:
    lock = WriteLock()
    assert lock.try_acquire()
    assert not lock.try_acquire()
    assert not lock.acquire(timeout=0.01)  # Held: gives up.
    released = threading.Timer(0.05, lock.release)
    released.start()
    assert lock.acquire(timeout=SETTLE)  # Woken by the release.
    released.join()
    lock.release()
    with lock:
        assert lock.locked()
    assert not lock.locked()


# ---------------------------------------------------------------- sendall from any thread


def test_sendall_from_many_threads_keeps_each_call_whole(serve: ServerFactory) -> None:
    # The crash: several threads writing big blocks to one slow
    # client made them share one poll object ("concurrent poll() invocation").
    block, writers, calls = 200_000, 6, 5
    failures: queue.Queue[BaseException] = queue.Queue()

    def handler(conn: Connection) -> None:
        def write(letter: int) -> None:
            try:
                for _ in range(calls):
                    conn.sendall(bytes([letter]) * block)
            except BaseException as exc:
                failures.put(exc)

        threads = [threading.Thread(target=write, args=(65 + i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SETTLE)

    server = serve(handler)
    with connect(server.tcp_address, timeout=SETTLE) as client:
        data = recv_exactly(client, block * writers * calls)
    assert failures.empty(), failures.get()
    letters = []
    for offset in range(0, len(data), block):
        piece = data[offset : offset + block]
        assert piece == piece[:1] * block, f"interleaved writes at byte {offset}"
        letters.append(piece[0])
    assert sorted(letters) == sorted(list(range(65, 65 + writers)) * calls)


def test_a_write_after_the_goodbye_raises_connection_closed(serve: ServerFactory) -> None:
    probe: Probe[Connection] = Probe(lambda conn: conn)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        conn = probe.result()
        # The handler returned: the server closed its side (FIN), and the
        # connection is lingering until this client closes.
        assert recv_until_eof(client) == b""
        with pytest.raises(ConnectionClosed) as raised:
            conn.sendall(b"too late\n")
    wait_until(lambda: not server.connections(), what="the connection to close")
    with pytest.raises(ConnectionClosed):
        conn.sendall(b"later still\n")
    error = raised.value
    # Caught by what users already catch around a send.
    assert isinstance(error, BrokenPipeError)
    assert isinstance(error, ConnectionError)
    assert isinstance(error, ThreadserveError)
    assert error.errno == errno.EPIPE


def test_at_stop_the_notice_is_the_last_thing_written_whatever_other_threads_write(
    serve: ServerFactory,
) -> None:
    writer_ended: queue.Queue[BaseException | int] = queue.Queue()
    writing = threading.Event()

    def handler(conn: Connection) -> None:
        def keep_writing() -> None:
            count = 0
            try:
                while count < 1_000_000:
                    conn.sendall(b"line %d\n" % count)
                    count += 1
                    writing.set()
            except BaseException as exc:
                writer_ended.put(exc)
            else:
                writer_ended.put(count)

        threading.Thread(target=keep_writing).start()
        conn.readline()  # b"" once the server stops; the writer keeps writing.

    server = serve(handler)
    with connect(server.tcp_address, timeout=SETTLE) as client:
        reader = Reader(client)
        assert writing.wait(SETTLE)
        server.stop()
        reader.join()
    outcome = writer_ended.get(timeout=SETTLE)
    assert isinstance(outcome, ConnectionClosed), outcome
    assert reader.error is None
    lines = reader.lines
    assert lines[-1] == NOTICE
    assert lines[:-1] == [b"line %d\n" % n for n in range(len(lines) - 1)]


# ---------------------------------------------------------------- groups


def room_handler(group: Group) -> Callable[[Connection], None]:
    """Join, say so, then broadcast every line ("others ..." lines skip their sender)."""

    def handler(conn: Connection) -> None:
        group.join(conn)
        conn.sendall(b"joined\n")
        while line := conn.readline():
            group.broadcast(line, exclude=conn if line.startswith(b"others") else None)

    return handler


def join_room(address: tuple[str, int], **options: int) -> socket.socket:
    sock = socket.socket()
    for option, value in options.items():
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, option), value)
    sock.settimeout(SETTLE)
    sock.connect(address)
    assert recv_exactly(sock, len(b"joined\n")) == b"joined\n"
    return sock


def test_broadcast_reaches_every_member_and_a_member_leaves_when_it_ends(
    serve: ServerFactory,
) -> None:
    group = Group()
    server = serve(room_handler(group))
    clients = [join_room(server.tcp_address) for _ in range(3)]
    try:
        assert len(group) == 3
        clients[0].sendall(b"all 1\n")
        for client in clients:
            assert recv_exactly(client, 6) == b"all 1\n"
        clients[1].sendall(b"others 2\n")
        clients[1].sendall(b"all 3\n")
        for client in (clients[0], clients[2]):
            assert recv_exactly(client, 15) == b"others 2\nall 3\n"
        assert recv_exactly(clients[1], 6) == b"all 3\n"  # Its own "others" line skipped it.
        clients[2].close()
        wait_until(lambda: len(group) == 2, what="the closed client to leave")
        assert group.broadcast(b"after\n") == 2
        for client in clients[:2]:
            assert recv_exactly(client, 6) == b"after\n"
    finally:
        for client in clients:
            client.close()


def test_join_after_the_connection_closed_raises(serve: ServerFactory) -> None:
    probe: Probe[Connection] = Probe(lambda conn: conn)
    server = serve(probe)
    with connect(server.tcp_address) as client:
        conn = probe.result()
        recv_until_eof(client)
    wait_until(lambda: not server.connections(), what="the connection to close")
    group = Group()
    with pytest.raises(ConnectionClosed):
        group.join(conn)
    assert len(group) == 0


def test_group_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_queued"):
        Group(max_queued=0)
    with pytest.raises(ValueError, match="cutoff_notice='bye': expected bytes or None"):
        Group(cutoff_notice="bye")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than the group's max_queued"):
        Group(max_queued=10).broadcast(b"x" * 11)


def test_a_member_that_never_reads_is_cut_off_and_the_others_get_everything(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    group = Group(max_queued=64 * 1024, cutoff_notice=b"Too slow\n")
    server = serve(room_handler(group))
    # A small receive buffer, so its kernel buffers fill quickly and the
    # group's queue for it is what grows.
    stalled = join_room(server.tcp_address, SO_RCVBUF=4096)
    sender = join_room(server.tcp_address)
    listeners = [join_room(server.tcp_address) for _ in range(3)]
    readers = [Reader(sock) for sock in [sender, *listeners]]
    sent = 0

    def readers_have(count: int) -> bool:
        return all(len(reader.lines) >= count for reader in readers)

    def send(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            sender.sendall(b"%06d " % sent + b"x" * 992 + b"\n")
            sent += 1
            # The test's own readers share one process with the server: let
            # them keep up, so only the stalled client falls behind.
            if sent % 16 == 0:
                wait_until(functools.partial(readers_have, sent - 16))

    try:
        while group.cut_off_count == 0 and sent < 20_000:
            send(16)
        assert group.cut_off_count == 1, f"not cut off after {sent} lines"
        assert len(group) == 4
        send(100)  # The others go on hearing everything.
        wait_until(lambda: all(len(r.lines) == sent for r in readers), what="every line")
        expected = [b"%06d " % n + b"x" * 992 + b"\n" for n in range(sent)]
        for reader in readers:
            assert reader.lines == expected
        # The stalled client got the lines in order, the last one maybe cut
        # short (it was half written when the queue was dropped), or whole
        # lines and the notice if its socket took it; then the end. Its server
        # side was closed as a write timeout.
        try:
            received = recv_until_eof(stalled)
        except ConnectionResetError:
            received = None
        if received is not None:
            received = received.removesuffix(b"Too slow\n")
            assert b"".join(expected).startswith(received)
        wait_until(
            lambda: any(
                getattr(record, "reason", None) == "write_timeout" for record in caplog.records
            ),
            what="the stalled connection's closing line",
        )
    finally:
        for sock in [stalled, sender, *listeners]:
            sock.close()


def test_a_member_whose_queue_makes_no_progress_is_cut_off_after_the_write_timeout(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    group = Group()  # 1 MiB: the write timeout, not the bound, ends this one.
    server = serve(room_handler(group), timeouts=Timeouts(write=0.5))
    stalled = join_room(server.tcp_address, SO_RCVBUF=4096)
    sender = join_room(server.tcp_address)
    reader = Reader(sender)
    try:
        lines = 0
        # Line by line until the stalled client's socket is full and the
        # flusher waits on it, so its queue stays far below the bound.
        while not flusher.running() and lines < 20_000:
            sender.sendall(b"y" * 1023 + b"\n")
            lines += 1
            wait_until(functools.partial(reader.has, lines), what="the sender's own line")
        assert flusher.running(), "the stalled client's socket never filled up"
        wait_until(lambda: len(group) == 1, what="the stalled member to be cut off")
        assert group.cut_off_count == 0  # Not for its queue's size.
        # The group drops the member first; the server logs the close when
        # the member's handler next reads and gets WriteTimeout, a moment later.
        wait_until(
            lambda: any(getattr(r, "reason", None) == "write_timeout" for r in caplog.records),
            what="the cut-off member's close logged as write_timeout",
        )
        sender.sendall(b"still here\n")
        wait_until(lambda: reader.lines[-1:] == [b"still here\n"], what="the sender's line")
    finally:
        stalled.close()
        sender.close()
