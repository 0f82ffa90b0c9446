"""Hostile clients on loopback: the server keeps serving, loses nothing, and frees what they held.

Each test attacks an in-process server and prints what it measured (run with
``pytest -s`` to see the figures). Waits are on the server's statistics or on
client-side events, bounded in time; the only timed pauses pace a load, they
never stand in for waiting on a state.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

import psutil
import pytest
from conftest import ServerFactory
from hostile import (
    ATTACKER_ADDRESS,
    STARVED,
    Sampler,
    client_address,
    connect_from,
    ms,
    percentile,
    report,
    reset,
)
from support import (
    connect,
    connection_threads,
    descriptors,
    descriptors_back,
    recv_exactly,
    server_process,
    wait_until,
)

from threadserve import Connection, Timeouts, echo
from threadserve._connection import DEFAULT_CHUNK_SIZE, DEFAULT_LINE_LIMIT
from threadserve._server import KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES
from threadserve.handlers import echo_lines
from threadserve.testing import RunningServer

MiB = 1024 * 1024
PROCESS = psutil.Process()


def rss() -> int:
    return PROCESS.memory_info().rss


def thread_count() -> int:
    return PROCESS.num_threads()


def fd_count() -> int:
    return PROCESS.num_fds()


def echo_round_trip(address: tuple[str, int], source: str = "127.0.0.1") -> float:
    """One new client, one line echoed: the time from connect to the echo."""
    started = time.monotonic()
    with connect_from(source, address, timeout=5) as client:
        client.sendall(b"still there?\n")
        assert recv_exactly(client, 13) == b"still there?\n"
        return time.monotonic() - started


# ---------------------------------------------------------------- keepalive


@pytest.mark.parametrize("keepalive", [True, False])
def test_accepted_sockets_carry_the_keepalive_settings(
    serve: ServerFactory, keepalive: bool
) -> None:
    seen: dict[str, int] = {}

    def inspect(conn: Connection) -> None:
        # The server-side socket itself: options set on the listener are
        # inherited by accepted sockets, which is what this checks.
        sock = conn._sock
        seen["keepalive"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        seen["idle"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
        seen["interval"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
        seen["probes"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
        seen["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        conn.sendall(b"ok\n")

    server = serve(inspect, keepalive=keepalive)
    with connect(server.tcp_address) as client:
        assert recv_exactly(client, 3) == b"ok\n"
    report("keepalive", enabled=keepalive, **seen)
    assert seen["nodelay"] != 0
    if keepalive:
        assert seen["keepalive"] != 0
        assert (seen["idle"], seen["interval"], seen["probes"]) == (
            KEEPALIVE_IDLE,
            KEEPALIVE_INTERVAL,
            KEEPALIVE_PROBES,
        )
    else:
        assert seen["keepalive"] == 0


# ---------------------------------------------------------------- over-long line


@dataclass
class OverlongLine:
    """What a client sending one endless line saw."""

    sent: int = 0
    send_error: str | None = None
    received: bytes = b""
    read_error: str | None = None
    cut_off_after: float = 0.0  # Until the server's notice and FIN arrived.
    sent_after: float = 0.0  # Until the client had sent everything (or failed).


def send_overlong_line(address: tuple[str, int], block: memoryview, blocks: int) -> OverlongLine:
    """Send ``blocks`` times ``block`` with no newline, reading whatever comes back meanwhile."""
    seen = OverlongLine()

    def send(client: socket.socket) -> None:
        try:
            for _ in range(blocks):
                client.sendall(block)
                seen.sent += len(block)
            client.shutdown(socket.SHUT_WR)
        except OSError as exc:  # The server may close while we are still sending.
            seen.send_error = type(exc).__name__
        seen.sent_after = time.monotonic() - started

    with connect(address) as client:
        started = time.monotonic()
        sender = threading.Thread(target=send, args=(client,), name="endless line sender")
        sender.start()
        received = bytearray()
        try:
            while chunk := client.recv(65536):
                received += chunk
        except OSError as exc:
            seen.read_error = type(exc).__name__
        seen.cut_off_after = time.monotonic() - started
        seen.received = bytes(received)
        sender.join(30)
        assert not sender.is_alive()
    return seen


def test_overlong_line_is_cut_off_after_the_limit_plus_one_chunk(serve: ServerFactory) -> None:
    server = serve(echo_lines)
    block = memoryview(bytes(MiB))  # Sent again and again: the client's memory stays flat.
    # Warm up on the same path with a 1 MiB line: what the first cut-off costs
    # once (thread stack, allocator arena) is not what grows with the line.
    assert send_overlong_line(server.tcp_address, block, 1).received == b"Line too long\n"
    wait_until(lambda: server.statistics().connections_active == 0, what="warm-up closed")
    received_before = server.statistics().bytes_received

    gc.collect()
    baseline = rss()
    with Sampler(rss, interval=0.005) as memory:
        seen = send_overlong_line(server.tcp_address, block, 100)
        wait_until(lambda: server.statistics().connections_active == 0, what="connection closed")
    read_by_server = server.statistics().bytes_received - received_before
    growth = memory.peak - baseline
    report(
        "over-long line",
        client_sent=f"{seen.sent / MiB:.0f} MiB",
        send_error=seen.send_error,
        received=seen.received,
        read_error=seen.read_error,
        cut_off_after=ms(seen.cut_off_after),
        all_sent_after=ms(seen.sent_after),
        server_read=f"{read_by_server} B",
        rss_growth=f"{growth / MiB:.2f} MiB",
    )
    # The lingering close reads and drops the rest of the line, so the client
    # usually finishes sending and then reads the notice and a clean EOF.
    assert seen.received == b"Line too long\n"
    assert seen.read_error is None
    assert read_by_server <= DEFAULT_LINE_LIMIT + DEFAULT_CHUNK_SIZE
    assert growth < 5 * MiB
    assert echo_round_trip(server.tcp_address) < STARVED


# ---------------------------------------------------------------- resets


def test_clients_that_send_a_mebibyte_then_reset_leave_nothing_behind(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(echo)
    assert echo_round_trip(server.tcp_address) < STARVED
    wait_until(lambda: not connection_threads(), what="the warm-up's thread to end")
    threads, fds, fd_kinds = thread_count(), fd_count(), descriptors()

    clients, wave = 1000, 100
    block = memoryview(bytes(MiB))
    for _ in range(clients // wave):
        socks = [connect(server.tcp_address) for _ in range(wave)]
        send_then_reset(socks, block, timeout=20)
    last_reset = time.monotonic()

    # The server may still have resets to read in its listen queue: settled
    # means every client accepted and gone, and its thread and socket with it.
    # On idle cores that takes well under a second; on busy ones the server's
    # threads wait their turn for a core, so the wait is generous: a thread or
    # socket that is never freed still fails it.
    wait_until(
        lambda: (
            server.statistics().connections_accepted == clients + 1
            and server.statistics().connections_active == 0
            and thread_count() <= threads
            and descriptors_back(fd_kinds)
        ),
        what="threads and descriptors back to baseline",
        state=lambda: (server.statistics(), f"{thread_count()} threads", descriptors()),
    )
    settled = time.monotonic() - last_reset
    threads_after, fds_after = thread_count(), fd_count()
    round_trip = echo_round_trip(server.tcp_address)
    stats = server.statistics()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    report(
        "resets",
        clients=clients,
        settled_after_last_reset=ms(settled),
        threads=f"{threads_after} (baseline {threads})",
        fds=f"{fds_after} (baseline {fds})",
        server_read=f"{stats.bytes_received / MiB:.0f} MiB",
        error_logs=len(errors),
        handler_errors=stats.handler_errors,
        echo_after=ms(round_trip),
    )
    assert stats.connections_accepted == clients + 2
    assert stats.handler_errors == 0
    assert not errors, [r.getMessage() for r in errors[:5]]
    assert round_trip < STARVED


def send_then_reset(socks: list[socket.socket], block: memoryview, timeout: float) -> None:
    """Each socket sends ``len(block)`` bytes, then resets; echoes are read and dropped.

    Reading keeps the echo server's replies flowing, so no send waits on a
    full window; the reset comes right after the last byte went out, with
    echoes still in flight both ways.
    """
    remaining = {sock: len(block) for sock in socks}
    selector = selectors.DefaultSelector()
    try:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, sock)
        deadline = time.monotonic() + timeout
        while remaining:
            assert time.monotonic() < deadline, f"{len(remaining)} clients could not send"
            for key, events in selector.select(deadline - time.monotonic()):
                sock = key.data
                if events & selectors.EVENT_READ:
                    with contextlib.suppress(BlockingIOError):
                        sock.recv(MiB)
                if events & selectors.EVENT_WRITE:
                    left = remaining[sock]
                    with contextlib.suppress(BlockingIOError):
                        left -= sock.send(block[len(block) - left :])
                    remaining[sock] = left
                    if not left:
                        del remaining[sock]
                        selector.unregister(sock)
                        reset(sock)
    finally:
        selector.close()
        for sock in socks:
            sock.close()  # Already reset and closed, except after a failure.


# ---------------------------------------------------------------- honest clients meanwhile


class EchoClients:
    """Honest clients from their own loopback addresses, each echoing a line every ``pace`` s.

    They run until ``stop()`` (bounded by ``limit`` seconds and ``rounds``
    round trips each) and record every round trip's latency, and when it
    ended, so a test can tell who was served while an attack held the
    server. Pausing between lines paces the load; it is not a wait for any
    state.
    """

    def __init__(
        self,
        address: tuple[str, int],
        count: int,
        *,
        pace: float = 0.02,
        rounds: int = 1000,
        limit: float = 20.0,
    ) -> None:
        self.latencies: list[float] = []
        self.served = [0] * count
        self.answered: list[tuple[float, int]] = []  # (When, which client), per round trip.
        self.errors: list[str] = []
        self._address = address
        self._pace = pace
        self._rounds = rounds
        self._limit = limit
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(index,), name=f"honest client {index}")
            for index in range(count)
        ]

    def start(self) -> EchoClients:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        for thread in self._threads:
            if thread.ident is not None:  # Started.
                thread.join(10)
                assert not thread.is_alive()

    def _run(self, index: int) -> None:
        line = f"honest client {index} says hello\n".encode()
        deadline = time.monotonic() + self._limit
        try:
            with connect_from(client_address(index), self._address, timeout=5) as sock:
                for _ in range(self._rounds):
                    started = time.monotonic()
                    sock.sendall(line)
                    if recv_exactly(sock, len(line)) != line:
                        raise AssertionError(f"client {index}: wrong echo")
                    answered = time.monotonic()
                    with self._lock:
                        self.latencies.append(answered - started)
                        self.answered.append((answered, index))
                        self.served[index] += 1
                    if self._done.wait(self._pace) or time.monotonic() > deadline:
                        return
        except (OSError, EOFError, AssertionError) as exc:
            with self._lock:
                self.errors.append(f"client {index}: {exc!r}")

    def served_between(self, start: float, end: float) -> set[int]:
        """The clients that had a round trip answered between ``start`` and ``end``."""
        with self._lock:
            return {index for answered, index in self.answered if start <= answered < end}


# ---------------------------------------------------------------- slowloris

BUSY = b"Server busy, try again later\n"
TIMED_OUT = b"Timed out\n"


@dataclass
class Attacker:
    """One hostile connection, and what it saw."""

    sock: socket.socket
    connected_at: float
    first_byte_at: float | None = None
    received: bytearray = field(default_factory=bytearray)
    reply_at: float | None = None
    eof_at: float | None = None
    error: str | None = None


def slowloris(
    server: RunningServer,
    count: int,
    admit: int,
    attack_started: threading.Event,
    limit: float,
) -> list[Attacker]:
    """Open ``count`` connections from the attacker address (of which the server
    should ``admit`` some), then trickle a byte a second into each one the server
    admitted, never a newline, until the server closes them all (or ``limit``
    seconds pass). One thread, one selector."""
    selector = selectors.DefaultSelector()
    attackers: list[Attacker] = []

    def receive(timeout: float) -> None:
        for key, _events in selector.select(timeout):
            attacker: Attacker = key.data
            try:
                chunk = attacker.sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                attacker.error = type(exc).__name__
                chunk = b""
            now = time.monotonic()
            if chunk:
                attacker.reply_at = attacker.reply_at or now
                attacker.received += chunk
            else:
                attacker.eof_at = now
                selector.unregister(attacker.sock)
                attacker.sock.close()

    def connect(how_many: int) -> None:
        for _ in range(how_many):
            sock = connect_from(ATTACKER_ADDRESS, server.tcp_address, timeout=5)
            sock.setblocking(False)
            attacker = Attacker(sock, time.monotonic())
            attackers.append(attacker)
            selector.register(sock, selectors.EVENT_READ, attacker)
            receive(0)  # Note a busy notice as soon as it lands.

    try:
        # Two waves: the first fills this address's quota, so each client of
        # the second is an excess one from its first packet on. (In one burst
        # the excess ones would also wait for the accept loop to start the
        # first wave's threads.)
        connect(admit)
        wait_until(
            lambda: server.statistics().connections_accepted >= admit,
            what="the first wave admitted",
        )
        connect(count - admit)

        # Let the server sort them all out first, so that the trickle goes only
        # to the admitted ones and a turned-away client reads its notice intact.
        def sorted_out() -> bool:
            stats = server.statistics()
            turned_away = sum(a.eof_at is not None for a in attackers)
            return stats.connections_accepted + turned_away >= count and (
                turned_away >= stats.connections_rejected
            )

        deadline = time.monotonic() + 10
        while not sorted_out():
            assert time.monotonic() < deadline, "the server did not sort out the attackers"
            receive(0.005)
        admitted = [a for a in attackers if a.eof_at is None]

        attack_started.set()
        end = time.monotonic() + limit
        next_byte = time.monotonic()
        while any(a.eof_at is None for a in admitted) and time.monotonic() < end:
            if time.monotonic() >= next_byte:
                for attacker in admitted:
                    if attacker.eof_at is not None:
                        continue
                    try:
                        attacker.sock.send(b"x")
                    except OSError as exc:
                        attacker.error = type(exc).__name__
                    attacker.first_byte_at = attacker.first_byte_at or time.monotonic()
                next_byte += 1.0
            receive(max(0.0, min(next_byte, end) - time.monotonic()))
        return attackers
    finally:
        selector.close()
        for attacker in attackers:
            attacker.sock.close()


def test_slowloris_is_cut_off_while_honest_clients_are_served(serve: ServerFactory) -> None:
    read_timeout = 2.0
    server = serve(
        echo_lines,
        max_connections=200,
        max_connections_per_ip=100,
        timeouts=Timeouts(read=read_timeout),
    )
    threads = thread_count()
    attack_started = threading.Event()
    attackers: list[Attacker] = []
    attack = threading.Thread(
        target=lambda: attackers.extend(slowloris(server, 300, 100, attack_started, limit=10)),
        name="slowloris",
    )
    honest = EchoClients(server.tcp_address, 50, pace=0.02)
    attack.start()
    try:
        assert attack_started.wait(20), "the attack never started"
        honest_from = time.monotonic()
        honest.start()  # They run until every admitted attacker has been cut off.
        attack.join(20)
        assert not attack.is_alive()
    finally:
        attack.join(20)
        honest.stop()

    rejected = [a for a in attackers if a.received.startswith(BUSY)]
    admitted = [a for a in attackers if a.first_byte_at is not None]
    rejected_after = [a.reply_at - a.connected_at for a in rejected if a.reply_at is not None]
    cut_off_after = [a.eof_at - a.first_byte_at for a in admitted if a.eof_at and a.first_byte_at]
    first_cut_off = min((a.eof_at for a in admitted if a.eof_at), default=honest_from)
    served_during_attack = honest.served_between(honest_from, first_cut_off)
    stats = server.statistics()
    report(
        "slowloris",
        attackers=len(attackers),
        admitted=len(admitted),
        rejected=len(rejected),
        rejected_max=ms(max(rejected_after)),
        cut_off_min=f"{min(cut_off_after):.3f} s",
        cut_off_max=f"{max(cut_off_after):.3f} s",
        honest_served=f"{sum(1 for n in honest.served if n)}/50",
        honest_served_during_attack=f"{len(served_during_attack)}/50",
        honest_round_trips=len(honest.latencies),
        honest_p50=ms(percentile(honest.latencies, 0.5)),
        honest_p99=ms(percentile(honest.latencies, 0.99)),
        honest_max=ms(max(honest.latencies)),
    )
    assert not honest.errors, honest.errors[:5]
    assert all(honest.served), "an honest client was never answered"
    # Served while every admitted attacker still held its thread, not once the
    # read timeout had freed them: an honest client queued behind the attack
    # (an accept loop or a slot it waits on) is answered only after the first
    # cut-off. This holds on a busy machine too: the attack holds the server
    # for the whole read timeout, and an honest round trip takes milliseconds.
    assert served_during_attack == set(range(50)), "honest clients waited for the attack to end"
    assert max(honest.latencies) < STARVED
    assert len(rejected) == 200
    assert len(admitted) == 100
    assert stats.connections_rejected == 200
    assert all(bytes(a.received) == BUSY and a.eof_at for a in rejected)
    # Told at once, not held until a timeout or a free slot: far below the
    # read timeout a held attacker waits for. The notice's latency itself is
    # a figure for bench/ (this process's clients share the server's GIL).
    assert max(rejected_after) < read_timeout / 2
    assert all(bytes(a.received) == TIMED_OUT and a.error is None for a in admitted)
    assert len(cut_off_after) == 100
    # Never before the read timeout; after it, only by what a busy machine
    # adds to waking the server's threads and this test's client loop.
    assert all(read_timeout - 0.5 <= t <= read_timeout + 1.5 for t in cut_off_after)
    wait_until(
        lambda: server.statistics().connections_active == 0 and thread_count() == threads,
        what="every connection closed",
        state=lambda: (server.statistics(), f"{thread_count()} threads, baseline {threads}"),
    )


# ---------------------------------------------------------------- flood


@pytest.mark.parametrize("policy", ["wait", "reject"])
def test_flood_of_2000_connections_against_a_limit_of_500(
    serve: ServerFactory, policy: str
) -> None:
    limit, total = 500, 2000
    # The clients and the server share this process: a full collection of
    # the garbage earlier tests left behind would pause both for tens of
    # milliseconds and be measured as the server's latency.
    gc.collect()
    server = serve(echo, max_connections=limit, overload=policy)
    address = server.tcp_address
    threads = thread_count()
    socks: list[socket.socket] = []
    connected_at: list[float] = []
    replies = [bytearray() for _ in range(total)]
    replied_at: dict[int, float] = {}
    eof: set[int] = set()
    selector = selectors.DefaultSelector()

    def receive(timeout: float) -> None:
        for key, _events in selector.select(timeout):
            index: int = key.data
            try:
                chunk = socks[index].recv(4096)
            except BlockingIOError:
                continue
            if chunk:
                replied_at.setdefault(index, time.monotonic())
                replies[index] += chunk
            else:
                eof.add(index)
                selector.unregister(socks[index])

    def line(index: int) -> bytes:
        return f"client {index}\n".encode()

    def connect_clients(first: int, end: int) -> None:
        for index in range(first, end):
            sock = socket.create_connection(address, timeout=5)
            connected_at.append(time.monotonic())
            socks.append(sock)
            if policy == "wait":
                # Queued clients speak at once; under reject they wait for the
                # verdict, so a turned-away client is not reset over bytes the
                # server never read.
                sock.sendall(line(index))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
            receive(0)  # Note a busy notice as soon as it lands.

    try:
        with (
            Sampler(thread_count, interval=0.001) as peak_threads,
            Sampler(lambda: server.statistics().connections_active, interval=0.001) as peak_active,
        ):
            started = time.monotonic()
            # Two waves: the first fills the server, so every client of the
            # second is an excess client from its first packet on. (In one
            # burst, clients beyond the 500th also wait for the accept loop to
            # start the first 500 threads; the report gives that figure.)
            connect_clients(0, limit)
            wait_until(
                lambda: server.statistics().connections_accepted == limit,
                timeout=20,
                what="the server full",
            )
            connect_clients(limit, total)
            connected_in = time.monotonic() - started

            deadline = time.monotonic() + 20
            if policy == "reject":
                # Every client gets its verdict: a thread, or the notice and EOF.
                while server.statistics().connections_rejected > len(eof) or len(eof) < (
                    total - limit
                ):
                    assert time.monotonic() < deadline, "busy notices did not all arrive"
                    receive(0.01)
                turned_away = sorted(eof)
                admitted = [i for i in range(total) if i not in eof]
                for index in admitted:
                    socks[index].sendall(line(index))
            else:
                # The first 500 are served; the rest wait in the listen queue.
                while len(replied_at) < limit:
                    assert time.monotonic() < deadline, "the first clients were not served"
                    receive(0.01)
                turned_away, admitted = [], list(range(total))
            stats = server.statistics()
            assert (stats.connections_accepted, stats.connections_active) == (limit, limit)
            assert stats.connections_rejected == len(turned_away)

            # Serve everyone still in: each client leaves once it has its echo,
            # which under "wait" lets the next 500 in, and so on.
            deadline = time.monotonic() + 30
            served = 0
            while served < len(admitted):
                assert time.monotonic() < deadline, f"only {served} clients served"
                receive(0.05)
                for index in admitted:
                    if socks[index].fileno() != -1 and bytes(replies[index]) == line(index):
                        with contextlib.suppress(KeyError):
                            selector.unregister(socks[index])
                        socks[index].close()
                        served += 1
            flood_over = time.monotonic()
        new_client = echo_round_trip(address)
    finally:
        selector.close()
        for sock in socks:
            sock.close()

    stats = server.statistics()
    busy_after = [replied_at[i] - connected_at[i] for i in turned_away]
    report(
        f"flood {policy}",
        clients=total,
        connected_in=f"{connected_in:.2f} s",
        served=served,
        turned_away=len(turned_away),
        busy_notice_p50=ms(percentile(busy_after, 0.5)) if busy_after else "-",
        busy_notice_max=ms(max(busy_after)) if busy_after else "-",
        threads=f"baseline {threads}, peak {peak_threads.peak} over {peak_threads.samples} samples",
        active_peak=peak_active.peak,
        flood_served_in=f"{flood_over - started:.2f} s",
        new_client_after=ms(new_client),
    )
    # The limit holds exactly for connections. For the process's threads it
    # holds give or take those that freed their slot and are ending: on a
    # busy machine they can take a while to be scheduled one last time (seen:
    # 510 with a baseline of 4 and a limit of 500, the samplers included). A
    # flood that is not held back takes a thread per client, 2,000.
    assert peak_active.peak <= limit
    assert peak_threads.peak <= threads + limit + 50
    assert new_client < STARVED
    if policy == "reject":
        assert len(turned_away) == 1500
        assert all(bytes(replies[i]) == BUSY for i in turned_away)
        # This test's point is the thread count and that every excess client
        # is told. Told at once, too: a notice that waited for a lingering
        # close of the one before (2 s each) or for a free slot would take
        # seconds; how many milliseconds it takes is a figure for bench/.
        assert max(busy_after) < 1.0
    else:
        assert stats.connections_rejected == 0
        assert stats.connections_accepted == total + 1


# ---------------------------------------------------------------- slow readers


def test_slow_readers_are_cut_off_by_the_write_timeout(serve: ServerFactory) -> None:
    write_timeout, linger = 2.0, 2.0
    server = serve(echo, timeouts=Timeouts(write=write_timeout), linger=linger)
    threads = thread_count()
    honest = EchoClients(server.tcp_address, 5, pace=0.02)
    readers, volume = 4, 50 * MiB
    block = memoryview(bytes(MiB))
    socks = [connect_from(client_address(100 + i), server.tcp_address) for i in range(readers)]
    peers = ["{}:{}".format(*sock.getsockname()) for sock in socks]
    wait_until(
        lambda: {c.peer for c in server.connections()} >= set(peers), what="readers accepted"
    )
    conns = {c.peer: c for c in server.connections()}
    server_side = [conns[peer] for peer in peers]
    sent = [0] * readers
    # Each reader's echo stalls once its receive window is full; from then on
    # the server reads nothing more from it. So the last time its counter of
    # bytes read moved is (just before) the server's send stopped progressing.
    read_by_server = [0] * readers
    last_read = [0.0] * readers
    gone_at: dict[int, float] = {}
    reset_at: dict[int, float] = {}
    selector = selectors.DefaultSelector()

    def watch_server() -> None:
        now = time.monotonic()
        live = set(server.connections())
        for index, conn in enumerate(server_side):
            if conn.bytes_received != read_by_server[index]:
                read_by_server[index], last_read[index] = conn.bytes_received, now
            if conn not in live:
                gone_at.setdefault(index, now)

    try:
        honest.start()
        for index, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_WRITE, index)
        deadline = time.monotonic() + 20
        while selector.get_map():
            assert time.monotonic() < deadline, f"sent only {sent}"
            watch_server()
            for key, _events in selector.select(0.005):
                index = key.data
                offset = sent[index] % MiB
                try:
                    count = socks[index].send(block[offset:])
                except BlockingIOError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    # The server gave up on the echo and closed at once.
                    reset_at.setdefault(index, time.monotonic())
                    selector.unregister(socks[index])
                    continue
                sent[index] += count
                if sent[index] >= volume:
                    selector.unregister(socks[index])

        def all_dropped() -> bool:
            watch_server()
            return len(gone_at) == readers

        # Never reading, never closing: the server has to let go by itself.
        # Bounded generously: how late the drops came is asserted below, with figures.
        wait_until(all_dropped, what="slow readers dropped", state=lambda: sorted(gone_at))
    finally:
        honest.stop()
        selector.close()
        for sock in socks:
            reset(sock)  # Unread echoes are queued: a plain close would reset anyway.

    # A client still sending when it is cut off sees the reset; one whose
    # whole volume was already queued sees nothing, and the server's registry
    # tells when its connection went.
    cut_off = [reset_at.get(i, gone_at[i]) - last_read[i] for i in range(readers)]
    dropped = [gone_at[i] - last_read[i] for i in range(readers)]
    all_stalled, first_dropped = max(last_read), min(gone_at.values())
    served_while_stalled = honest.served_between(all_stalled, first_dropped)
    report(
        "slow readers",
        readers=readers,
        sent=f"{min(sent) / MiB:.0f} MiB each",
        server_read_before_stall=", ".join(f"{n / MiB:.1f} MiB" for n in read_by_server),
        cut_off_after_stall=", ".join(f"{t:.3f} s" for t in cut_off),
        thread_freed_after_stall=", ".join(f"{t:.3f} s" for t in dropped),
        honest_round_trips=len(honest.latencies),
        honest_served_while_stalled=f"{len(served_while_stalled)}/5",
        honest_p99=ms(percentile(honest.latencies, 0.99)),
        honest_max=ms(max(honest.latencies)),
    )
    # The server gives up on the echo after the write timeout and closes at
    # once: a client that reads nothing gains nothing from a lingering close.
    # Both ends are seen by polling from the test. A late poll notes the last
    # read late, which shortens the figure (hence the slack below the
    # timeout), or notes the drop late, which lengthens it (hence above): on a
    # busy machine a poll can come a few hundred milliseconds late. A write
    # timeout that does not fire, or fires at twice its value, still fails.
    assert all(write_timeout - 0.5 <= t <= write_timeout + 1.5 for t in cut_off)
    assert all(t <= write_timeout + 1.5 for t in dropped)
    assert not honest.errors, honest.errors[:5]
    assert all(honest.served)
    # Every honest client was answered while all four readers held a thread
    # stuck in a send: a stalled send blocks its own connection only.
    assert served_while_stalled == set(range(5)), "honest clients waited for the slow readers"
    assert max(honest.latencies) < STARVED
    wait_until(
        lambda: server.statistics().connections_active == 0 and thread_count() == threads,
        what="threads back to baseline",
        state=lambda: (server.statistics(), f"{thread_count()} threads, baseline {threads}"),
    )


# ---------------------------------------------------------------- churn


def churn(address: tuple[str, int], total: int, concurrency: int, limit: float) -> None:
    """``total`` short connections, ``concurrency`` at a time: connect, one line, its echo, close.

    One thread and a selector drive them all, so the client side costs no
    threads of its own and leaves the server's as the only ones to count.
    """
    line = b"churn\n"
    selector = selectors.DefaultSelector()
    replies: dict[socket.socket, bytearray] = {}
    opened = finished = 0

    def open_one() -> None:
        nonlocal opened
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        error = sock.connect_ex(address)
        if error not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(error, f"connect: {os.strerror(error)}")
        replies[sock] = bytearray()
        selector.register(sock, selectors.EVENT_WRITE)
        opened += 1

    try:
        deadline = time.monotonic() + limit
        for _ in range(min(concurrency, total)):
            open_one()
        while finished < total:
            assert time.monotonic() < deadline, f"{finished} of {total} done in {limit} s"
            for key, events in selector.select(1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if events & selectors.EVENT_WRITE:
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise OSError(error, f"connect: {os.strerror(error)}")
                    sock.send(line)  # Six bytes into an empty buffer: never partial.
                    selector.modify(sock, selectors.EVENT_READ)
                    continue
                chunk = sock.recv(64)
                reply = replies[sock]
                reply += chunk
                if chunk and len(reply) < len(line):
                    continue
                assert reply == line, f"got {bytes(reply)!r}"
                selector.unregister(sock)
                del replies[sock]
                sock.close()
                finished += 1
                if opened < total:
                    open_one()
    finally:
        selector.close()
        for sock in replies:
            sock.close()


@pytest.mark.slow
@pytest.mark.timeout(360)  # The churn's own limits, and a wait to settle.
def test_churn_of_short_connections_leaks_nothing(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Two log lines per connection would pile up in caplog (it keeps every
    # record): that would be the test's memory growing, not the server's.
    caplog.set_level(logging.WARNING, logger="threadserve")
    server = serve(echo)
    total, concurrency, warm_up = 50_000, 200, 5_000
    # Warm-up: thread stacks cached by the C library, allocator arenas,
    # interned objects; what is left to grow after this would be a leak.
    # Time limits for a busy machine: about 2,500 connections a second on
    # idle cores, 700 with two other processes spinning on them.
    churn(server.tcp_address, warm_up, concurrency, limit=120)
    wait_until(lambda: not connection_threads(), what="the warm-up's threads to end")
    gc.collect()
    memory, threads, fds, fd_kinds = rss(), thread_count(), fd_count(), descriptors()

    started = time.monotonic()
    churn(server.tcp_address, total, concurrency, limit=240)
    elapsed = time.monotonic() - started
    wait_until(
        lambda: (
            server.statistics().connections_active == 0
            and thread_count() <= threads
            and descriptors_back(fd_kinds)
        ),
        what="threads and descriptors back to baseline",
        state=lambda: (server.statistics(), f"{thread_count()} threads", descriptors()),
    )
    gc.collect()
    growth = rss() - memory
    stats = server.statistics()
    report(
        "churn",
        connections=total,
        concurrency=concurrency,
        elapsed=f"{elapsed:.1f} s",
        rate=f"{total / elapsed:.0f}/s",
        rss_growth=f"{growth / MiB:.2f} MiB",
        threads=f"{thread_count()} (baseline {threads})",
        fds=f"{fd_count()} (baseline {fds})",
    )
    assert stats.connections_accepted == warm_up + total
    assert stats.handler_errors == 0
    assert growth < 10 * MiB


def test_every_turned_away_client_gets_the_busy_notice_promptly() -> None:
    """The reject policy, with the server in a process of its own.

    In process, the test's 2,000-socket client loop and the server share one
    GIL, and the loop's Python delays the server's system calls; here the
    server runs as it would in production. Every excess client is told at
    once, by the accept loop: the notice and EOF, with no lingering close
    and no wait for a free slot. The goal of 50 ms per notice is a latency
    figure, for bench/: here it measured 10 ms at most, and up to 190 ms with
    two other processes spinning on both cores. The bound here is what a busy
    machine cannot reach and a notice that waits on anything (a linger of
    2 s per client, a slot that never frees) does.
    """
    limit, excess = 500, 1500
    with server_process(
        "echo",
        "--bind",
        "127.0.0.1:0",
        "--max-connections",
        str(limit),
        "--overload",
        "reject",
    ) as (_server, address):
        held: list[socket.socket] = []
        turned_away: list[socket.socket] = []
        selector = selectors.DefaultSelector()
        connected_at: dict[int, float] = {}
        notice_after: dict[int, float] = {}
        received = [bytearray() for _ in range(excess)]

        def collect(timeout: float) -> None:
            for key, _events in selector.select(timeout):
                index = key.data
                chunk = turned_away[index].recv(256)
                received[index] += chunk
                if not chunk:
                    notice_after[index] = time.monotonic() - connected_at[index]
                    selector.unregister(turned_away[index])

        try:
            for _ in range(limit):
                held.append(connect(address))
            for sock in held:  # Every held client is served, so every slot is taken.
                sock.sendall(b"x")
            for sock in held:
                assert recv_exactly(sock, 1) == b"x"
            for index in range(excess):
                sock = connect(address)
                connected_at[index] = time.monotonic()
                turned_away.append(sock)
                selector.register(sock, selectors.EVENT_READ, index)
                collect(0)  # Read what already came, so waiting here is not counted.
            deadline = time.monotonic() + 10
            while selector.get_map() and time.monotonic() < deadline:
                collect(0.05)
        finally:
            selector.close()
            for sock in held + turned_away:
                sock.close()
    latencies = sorted(notice_after.values())
    report(
        "busy notice, server in its own process",
        turned_away=len(latencies),
        p50=ms(percentile(latencies, 0.5)),
        p99=ms(percentile(latencies, 0.99)),
        max=ms(latencies[-1]),
    )
    assert len(latencies) == excess
    assert all(bytes(data) == BUSY for data in received)
    assert latencies[-1] < 1.0
