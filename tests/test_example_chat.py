"""examples/chat.py run as a user runs it: many clients, one that never reads, and SIGTERM."""

from __future__ import annotations

import functools
import re
import signal
import socket
import threading
from collections.abc import Iterator

import pytest
from example_process import example_process
from support import NOTICE, SETTLE, ServerProcess, recv_until_eof, wait_until

pytestmark = pytest.mark.timeout(300)

CLIENTS = 50
LINES = 100
#: What the chat server prefixes to a line: the sender's address.
CHAT_LINE = re.compile(rb"^127\.0\.0\.1:\d+: c(\d+) (\d+)( x*)?\n$")


@pytest.fixture
def chat() -> Iterator[ServerProcess]:
    """The chat server with its default queue bound (1 MiB), more than any test sends."""
    with example_process("chat", "--bind", "127.0.0.1:0") as process:
        yield process


@pytest.fixture
def small_queue_chat() -> Iterator[ServerProcess]:
    with example_process("chat", "--bind", "127.0.0.1:0", "--max-queued", "65536") as process:
        yield process


class Client:
    """A chat client whose own thread reads every line, until EOF or an error."""

    def __init__(self, address: tuple[str, int], *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(SETTLE)
        self.sock.connect(address)
        self.lines: list[bytes] = []
        self.error: BaseException | None = None
        self.welcomed = threading.Event()
        self._thread: threading.Thread | None = None

    def start_reading(self) -> Client:
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def read_welcome(self) -> None:
        """Read up to the welcome line, one byte at a time, and nothing after it."""
        line = b""
        while not line.startswith(b"* welcome"):
            line = b""
            while not line.endswith(b"\n"):
                byte = self.sock.recv(1)
                assert byte, "EOF before the welcome"
                line += byte

    def _read(self) -> None:
        buffer = b""
        try:
            while chunk := self.sock.recv(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.startswith(b"* welcome"):
                        self.welcomed.set()
                    self.lines.append(line + b"\n")
            if buffer:
                self.lines.append(buffer)
        except OSError as exc:
            self.error = exc

    def chat_lines(self) -> list[tuple[int, int]]:
        """(sender, number) of every chat line received, in order; announcements left out."""
        received = []
        for line in self.lines:
            match = CHAT_LINE.match(line)
            if match:
                received.append((int(match[1]), int(match[2])))
        return received

    def has(self, count: int) -> bool:
        return len(self.chat_lines()) >= count

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(SETTLE)
        assert not self._thread.is_alive(), "still reading"

    def close(self) -> None:
        self.sock.close()


def enter_room(address: tuple[str, int], count: int) -> list[Client]:
    clients = [Client(address).start_reading() for _ in range(count)]
    for client in clients:
        assert client.welcomed.wait(SETTLE), "no welcome"
    return clients


def assert_in_order(received: list[tuple[int, int]], sent: dict[int, int]) -> None:
    """Every line of every sender exactly once, each sender's in the order sent."""
    by_sender: dict[int, list[int]] = {}
    for sender, number in received:
        by_sender.setdefault(sender, []).append(number)
    assert by_sender == {sender: list(range(count)) for sender, count in sent.items() if count}


def test_every_client_gets_every_line_once_whole_and_in_order(chat: ServerProcess) -> None:
    clients = enter_room(chat.wait_serving(), CLIENTS)
    try:
        # Round by round, every client sends its next line while all of them read.
        for number in range(LINES):
            for index, client in enumerate(clients):
                client.sock.sendall(b"c%d %d\n" % (index, number))
        total = CLIENTS * LINES
        for client in clients:
            wait_until(functools.partial(client.has, total), what="every line")
        sent = dict.fromkeys(range(CLIENTS), LINES)
        for client in clients:
            assert client.error is None
            assert_in_order(client.chat_lines(), sent)
    finally:
        for client in clients:
            client.close()


def test_a_client_that_never_reads_is_cut_off_and_the_others_keep_receiving(
    small_queue_chat: ServerProcess,
) -> None:
    chat = small_queue_chat
    address = chat.wait_serving()
    stalled = Client(address, rcvbuf=4096)
    stalled.read_welcome()  # In the room; it reads nothing more.
    clients = enter_room(address, 5)
    sender = clients[0]
    sent = 0

    def send(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            sender.sock.sendall(b"c0 %d " % sent + b"x" * 1000 + b"\n")
            sent += 1
        # The test's readers run on this busy machine too: let them keep up,
        # so that only the stalled client falls behind.
        for client in clients:
            wait_until(functools.partial(client.has, sent), what="the readers")

    try:
        while "cut off" not in chat.output() and sent < 20_000:
            send(16)
        chat.wait_for_log(r"fell more than 65536 bytes behind; cut off")
        before = sent
        send(100)  # The others go on hearing everything, the stalled one's share too.
        assert sent == before + 100
        for client in clients:
            assert client.error is None
            assert_in_order(client.chat_lines(), {0: sent})
        # The stalled client was closed: what it gets is the lines in order
        # (the last maybe cut short), then the end, or a reset.
        try:
            received = recv_until_eof(stalled.sock)
        except ConnectionResetError:
            received = b""
        complete = [line + b"\n" for line in received.split(b"\n")[:-1]]
        numbers = [int(m[2]) for line in complete if (m := CHAT_LINE.match(line))]
        assert numbers == list(range(len(numbers)))
        chat.wait_for_log(r"connection closed: .*\(.*fell more than 65536 bytes behind; cut off\)")
    finally:
        stalled.close()
        for client in clients:
            client.close()


def test_sigterm_mid_chat_delivers_everything_sent_then_the_notice_then_eof(
    chat: ServerProcess,
) -> None:
    clients = enter_room(chat.wait_serving(), CLIENTS)
    try:
        rounds = LINES // 2
        for number in range(rounds):
            for index, client in enumerate(clients):
                client.sock.sendall(b"c%d %d\n" % (index, number))
        # The stop contract covers what a handler has read before the stop,
        # not bytes still in the kernel's receive queue (sendall returning
        # means only that). So stop once the server has read and broadcast
        # every line, which one client having them all shows; the others may
        # still have some of them queued in the room, and must get them
        # before the notice.
        wait_until(
            functools.partial(clients[0].has, CLIENTS * rounds),
            what="the server to read and broadcast every line",
        )
        chat.send_signal(signal.SIGTERM)
        for client in clients:
            client.join()
        assert chat.wait_exit() == 0
        sent = dict.fromkeys(range(CLIENTS), rounds)
        for client in clients:
            assert client.error is None, client.error  # A clean EOF, not a reset.
            assert client.lines[-1] == NOTICE
            assert_in_order(client.chat_lines(), sent)
            # Nothing after the notice; the notice only once.
            assert client.lines.count(NOTICE) == 1
    finally:
        for client in clients:
            client.close()
