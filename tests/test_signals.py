"""The stop contract as a user meets it: a server process, real signals, many real clients."""

from __future__ import annotations

import re
import resource
import signal
import socket
from collections.abc import Iterator

import pytest
from subprocess_handlers import READ_ACK
from support import NOTICE, ServerProcess, connect, recv_many, server_process

pytestmark = pytest.mark.timeout(60)


def raise_fd_limit(needed: int) -> None:
    """Make room for ``needed`` descriptors here and in the server (it inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    """A list to put client sockets in; whatever is still open is closed at teardown."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def connect_many(address: tuple[str, int], count: int, into: list[socket.socket]) -> None:
    for _ in range(count):
        into.append(connect(address))


def exchange_lines(socks: list[socket.socket], lines: list[bytes]) -> None:
    """Each client sends its line; wait until every one is echoed (so it is accepted and served)."""
    for sock, line in zip(socks, lines, strict=True):
        sock.sendall(line)
    assert recv_many(socks, sizes=[len(line) for line in lines]) == lines


def stopped_line(drained: int, forced: int) -> str:
    return rf"stopped in ([\d.]+) s: {drained} drained, {forced} forced$"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_200_clients_idle_and_mid_stream_get_everything_then_notice_then_eof(
    signum: signal.Signals, clients: list[socket.socket]
) -> None:
    count, frames, grace = 200, 3, 5.0
    raise_fd_limit(4 * count + 100)
    handler = "subprocess_handlers:hold_until_stop"
    args = [handler, "--bind", "127.0.0.1:0", "--grace", str(grace)]
    with server_process(*args) as (server, address):
        connect_many(address, count, clients)
        for frame in range(frames):
            exchange_lines(clients, [f"{i}:{frame}\n".encode() for i in range(count)])
        # Every other client is mid-stream: a line the server has read (it
        # acknowledged it) but will answer only once the stop has begun.
        held = b"H" * 1000 + b"\n"
        mid_stream = set(range(0, count, 2))
        for index in mid_stream:
            clients[index].sendall(held)
        acks = recv_many(
            clients, sizes=[len(READ_ACK) if i in mid_stream else 0 for i in range(count)]
        )
        assert all(acks[i] == READ_ACK for i in mid_stream)

        sent_at = server.send_signal(signum)
        received = recv_many(clients, timeout=grace + 5)
        assert server.wait_exit(grace + 5) == 0, server.output()
        elapsed = server.exited_at - sent_at
        output = server.output()

    for index, data in enumerate(received):
        expected = (held if index in mid_stream else b"") + NOTICE
        assert data == expected, f"client {index}"
    print(f"\n{count} clients ({len(mid_stream)} mid-stream), {signum.name}: exit {elapsed:.3f} s")
    # Well within the grace, and below the 2 s linger timeout: a stop that
    # waited out lingering closes instead of seeing each client's EOF fails.
    assert elapsed < 1.5, f"stop took {elapsed:.3f} s of a {grace} s grace"
    assert f"{signum.name} received: stopping gracefully" in output
    assert re.search(stopped_line(count, 0), output, re.MULTILINE), output
    assert " ERROR " not in output, output
    assert "Traceback" not in output, output


def test_stuck_handler_is_forced_after_grace_named_and_exits_3(
    clients: list[socket.socket],
) -> None:
    grace, others = 2.0, 10
    handler = "subprocess_handlers:stuck_on_request"
    args = [handler, "--bind", "127.0.0.1:0", "--grace", str(grace)]
    with server_process(*args) as (server, address):
        connect_many(address, others + 1, clients)
        exchange_lines(clients, [f"{i}\n".encode() for i in range(others + 1)])
        stuck = clients[-1]
        stuck_thread = f"threadserve 127.0.0.1:{stuck.getsockname()[1]}"
        stuck.sendall(b"STUCK\n")
        assert recv_many([stuck], sizes=[len(READ_ACK)]) == [READ_ACK]

        sent_at = server.send_signal(signal.SIGINT)
        received = recv_many(clients, timeout=grace + 5)
        assert server.wait_exit(grace + 5) == 3, server.output()
        elapsed = server.exited_at - sent_at
        output = server.output()

    # The others drained as usual; the stuck one was forced: EOF, no notice.
    assert received == [NOTICE] * others + [b""]
    print(f"\nstuck handler, grace {grace} s: exit {elapsed:.3f} s")
    # Forced at the grace deadline, then at most a short margin to report the
    # stuck thread and exit (measured 2.34 s with both cores busy with other
    # processes). Waiting for the stuck thread, or twice the grace, fails.
    assert grace <= elapsed <= grace + 1.5
    assert re.search(
        rf"ERROR threadserve: thread '{re.escape(stuck_thread)}' did not stop", output
    ), output
    assert "sleep_ignoring_the_token" in output  # Its stack, down to the call that is stuck.
    assert re.search(stopped_line(others, 1), output, re.MULTILINE), output


def test_second_signal_forces_at_once(clients: list[socket.socket]) -> None:
    grace = 30.0
    handler = "subprocess_handlers:stuck_on_request"
    args = [handler, "--bind", "127.0.0.1:0", "--grace", str(grace)]
    with server_process(*args) as (server, address):
        connect_many(address, 1, clients)
        stuck = clients[0]
        stuck.sendall(b"STUCK\n")
        assert recv_many([stuck], sizes=[len(READ_ACK)]) == [READ_ACK]

        server.send_signal(signal.SIGINT)
        server.wait_for_log(r"stopping: 1 connection,")
        # Stopping means not accepting: the listener is already closed.
        with pytest.raises(ConnectionRefusedError):
            connect(address).close()
        again_at = server.send_signal(signal.SIGINT)
        assert server.wait_exit(10) == 3, server.output()
        elapsed = server.exited_at - again_at
        assert recv_many([stuck]) == [b""]
        output = server.output()

    print(f"\nsecond SIGINT to exit: {elapsed:.3f} s")
    # At once, against the 30 s grace the first signal started (measured
    # 0.33 s with both cores busy with other processes).
    assert elapsed < 3.0
    assert "SIGINT received again: forcing the stop now" in output
    assert "did not stop" in output


def test_a_signal_caught_by_a_connection_thread_still_stops_the_server(
    clients: list[socket.socket],
) -> None:
    # A process-directed signal can be handled by any thread that does not
    # block it. Python runs the handler only in the main thread, and only when
    # that thread wakes: asleep in the accept loop's wait with no timeout, it
    # must be woken by the signal itself, or the server serves on for good.
    with server_process("subprocess_handlers:sigterm_on_this_thread", "--bind", "127.0.0.1:0") as (
        server,
        address,
    ):
        connect_many(address, 2, clients)
        raiser, bystander = clients
        exchange_lines(clients, [b"first\n", b"second\n"])
        raiser.sendall(b"TERM\n")
        reply = f"raised in {server.process.pid}\n".encode()
        assert recv_many([raiser], sizes=[len(reply)]) == [reply]
        assert server.wait_exit(20) == 0, server.output()
        assert recv_many([bystander]) == [NOTICE]
        assert recv_many([raiser]) == [NOTICE]
        output = server.output()
    assert "SIGTERM received: stopping gracefully" in output
    assert re.search(stopped_line(2, 0), output, re.MULTILINE), output


def test_stop_time_with_1000_idle_connections(clients: list[socket.socket]) -> None:
    count = 1000
    raise_fd_limit(4 * count + 100)
    with server_process("echo", "--bind", "127.0.0.1:0") as (server, address):
        connect_many(address, count, clients)
        # One echo each: every connection is accepted and its thread is serving.
        exchange_lines(clients, [f"{i}\n".encode() for i in range(count)])

        sent_at = server.send_signal(signal.SIGTERM)
        received = recv_many(clients, timeout=20)
        assert server.wait_exit(20) == 0, server.output()
        elapsed = server.exited_at - sent_at
        output = server.output()

    assert received == [NOTICE] * count
    stopped = re.search(stopped_line(count, 0), output, re.MULTILINE)
    assert stopped, output
    print(
        f"\n{count} idle connections: SIGTERM to exit {elapsed:.3f} s"
        f" (the server's own stop sequence: {stopped.group(1)} s)"
    )
    # The target is 1 s, a figure for bench/. On two cores this measured
    # 0.3-1.0 s with the cores otherwise idle (every connection thread wakes
    # at once and they queue for the GIL), and 0.5-3 s while other processes
    # loaded them: the bound catches a stop that serialises on something (6 ms
    # per connection, a linger per group of them) without failing on a busy
    # machine. (A stop that waits out lingering closes fails the 200-client test.)
    assert elapsed < 6.0


def test_server_process_helper_kills_what_it_started() -> None:
    # The fixture-like guarantee every test above relies on: no server outlives its test.
    with ServerProcess(["echo", "--bind", "127.0.0.1:0"]) as server:
        server.wait_serving()
    assert server.process.returncode == -signal.SIGKILL
