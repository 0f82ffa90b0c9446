"""Connection threads are reused: they park between connections, within bounds, and end at stop."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from support import SETTLE, wait_for_value, wait_until

from threadserve import ConfigurationError, Connection, Server, echo
from threadserve._accept import ACCEPT_LOOP_LAG
from threadserve._threads import PARKED_NAME, ParkingThreads
from threadserve.testing import RunningServer, running_server


def _one_exchange(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=SETTLE) as client:
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"


def _parked() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PARKED_NAME]


# ---------------------------------------------------------------- ParkingThreads alone


def test_a_finished_thread_runs_the_next_job_instead_of_ending() -> None:
    ran: list[tuple[int, int]] = []
    done = threading.Semaphore(0)

    def run(job: int) -> None:
        ran.append((job, threading.get_ident()))
        done.release()

    threads: ParkingThreads[int] = ParkingThreads(run, max_idle=4, idle_timeout=30)
    threads.start(1, name="threadserve test")
    assert done.acquire(timeout=SETTLE)
    wait_until(lambda: threads.idle == 1, what="the thread to park")
    assert threads.hand_off(2)
    assert done.acquire(timeout=SETTLE)
    assert [job for job, _ in ran] == [1, 2]
    assert ran[0][1] == ran[1][1], "the second job ran on a new thread"
    assert (threads.started, threads.reused) == (1, 1)
    threads.close()
    wait_until(lambda: not _parked(), what="the parked thread to end at close")


def test_hand_off_with_no_parked_thread_says_so() -> None:
    threads: ParkingThreads[int] = ParkingThreads(lambda job: None, max_idle=4)
    assert not threads.hand_off(1)
    assert threads.reused == 0


def test_threads_beyond_max_idle_end_instead_of_parking() -> None:
    release = threading.Event()
    threads: ParkingThreads[int] = ParkingThreads(
        lambda job: release.wait(30), max_idle=2, idle_timeout=30
    )
    for job in range(5):
        threads.start(job, name="threadserve test")
    release.set()
    wait_until(lambda: threads.idle == 2 and len(_parked()) == 2, what="two threads parked")
    # The other three ended: only the bound stays.
    wait_until(
        lambda: sum(t.name.startswith("threadserve test") for t in threading.enumerate()) == 0,
        what="the threads beyond the bound to end",
    )
    threads.close()
    wait_until(lambda: not _parked(), what="parked threads to end at close")


def test_a_parked_thread_retires_after_the_idle_timeout() -> None:
    threads: ParkingThreads[int] = ParkingThreads(lambda job: None, max_idle=4, idle_timeout=0.2)
    threads.start(1, name="threadserve test")
    wait_until(lambda: not _parked() and threads.idle == 0, what="the idle thread to retire")
    assert not threads.hand_off(2), "a retired thread was still counted as parked"


def test_close_ends_parked_threads_and_keeps_running_ones_from_parking() -> None:
    release = threading.Event()
    threads: ParkingThreads[int] = ParkingThreads(
        lambda job: release.wait(30) if job else None, max_idle=8, idle_timeout=30
    )
    threads.start(0, name="threadserve test")  # Finishes at once and parks.
    wait_until(lambda: threads.idle == 1, what="a thread to park")
    threads.start(1, name="threadserve busy")  # Still running at close().
    threads.close()
    wait_until(lambda: not _parked(), what="the parked thread to end at close")
    release.set()
    wait_until(
        lambda: not any(t.name.startswith("threadserve") for t in threading.enumerate()),
        what="the running thread to end instead of parking",
    )
    assert threads.idle == 0


def test_hand_offs_racing_with_idle_timeouts_lose_no_job() -> None:
    """A thread timing out while a job is handed to it must not strand the job."""
    served = threading.Semaphore(0)
    threads: ParkingThreads[int] = ParkingThreads(
        lambda job: served.release(), max_idle=4, idle_timeout=0.001
    )
    jobs = 0
    for job in range(300):  # Bounded; the tiny timeout makes the race frequent.
        if not threads.hand_off(job):
            threads.start(job, name="threadserve test")
        jobs += 1
        assert served.acquire(timeout=SETTLE), f"job {job} was lost"
    threads.close()
    wait_until(lambda: not _parked(), what="parked threads to end at close")
    assert threads.started + threads.reused == jobs


# ---------------------------------------------------------------- in the server


def test_short_connections_reuse_parked_threads() -> None:
    with running_server(echo) as server:
        for _ in range(50):
            _one_exchange(server.tcp_address)
            # The next connection finds the thread parked once it is back.
            wait_until(lambda: server.statistics().connections_active == 0, what="close")
            wait_until(lambda: server.statistics().threads_idle >= 1, what="park")
        stats = server.statistics()
        assert stats.connections_accepted == 50
        assert stats.threads_started + stats.threads_reused == 50
        assert stats.threads_started == 1, stats


def test_a_reused_thread_is_named_after_its_new_peer() -> None:
    names: list[str] = []

    def record(conn: Connection) -> None:
        names.append(threading.current_thread().name)
        echo(conn)

    with running_server(record) as server:
        for _ in range(3):
            _one_exchange(server.tcp_address)
            wait_until(lambda: server.statistics().threads_idle == 1, what="park")
        assert server.statistics().threads_started == 1
    assert len(names) == 3
    assert all(name.startswith("threadserve 127.0.0.1:") for name in names), names
    assert len(set(names)) == 3, "the thread kept an earlier peer's name"


def test_parked_threads_end_at_stop_and_hold_no_connection() -> None:
    # Many, so that on a loaded machine their ends take longer than the
    # stop's short margin for forced threads: stop() must still wait for them.
    count = 200
    with running_server(echo) as server:
        clients = [
            socket.create_connection(server.tcp_address, timeout=SETTLE) for _ in range(count)
        ]
        for client in clients:
            client.sendall(b"x")
            assert client.recv(1) == b"x"
        for client in clients:
            client.close()
        wait_until(lambda: server.statistics().threads_idle == count, what="threads to park")
        assert server.statistics().connections_active == 0
        assert server.connections() == []
        report = server.stop()
        assert report is not None
        assert report.clean
        assert (report.drained, report.forced) == (0, 0)
    assert not _parked(), "a parked thread outlived the stop"


def test_idle_threads_zero_starts_a_thread_per_connection() -> None:
    with running_server(echo, idle_threads=0) as server:
        for _ in range(3):
            _one_exchange(server.tcp_address)
            wait_until(lambda: server.statistics().connections_active == 0, what="close")
        stats = server.statistics()
        assert (stats.threads_started, stats.threads_reused, stats.threads_idle) == (3, 0, 0)


def test_max_connections_still_holds_with_parked_threads() -> None:
    with running_server(echo, max_connections=2) as server:
        for _ in range(4):
            _one_exchange(server.tcp_address)
        wait_until(lambda: server.statistics().threads_idle >= 1, what="park")
        held = [socket.create_connection(server.tcp_address, timeout=SETTLE) for _ in range(3)]
        for client in held[:2]:
            client.sendall(b"y")
            assert client.recv(1) == b"y"
        # The third waits in the listen queue (policy: wait), not served.
        held[2].settimeout(0.3)
        held[2].sendall(b"z")
        with pytest.raises(TimeoutError):
            held[2].recv(1)
        assert server.statistics().connections_active == 2
        held[0].close()
        held[2].settimeout(SETTLE)
        assert held[2].recv(1) == b"z"
        for client in held[1:]:
            client.close()


@pytest.mark.parametrize("value", [-1, 1.5, True, "4"])
def test_idle_threads_must_be_a_count(value: object) -> None:
    with pytest.raises(ConfigurationError, match="idle_threads"):
        Server(echo, "127.0.0.1:0", idle_threads=value)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the next client, taken directly


def test_a_job_at_hand_runs_on_the_finished_thread_without_parking() -> None:
    at_hand = [2, 3]
    ran: list[tuple[int, int]] = []
    done = threading.Semaphore(0)

    def run(job: int) -> None:
        ran.append((job, threading.get_ident()))
        done.release()

    def next_job() -> int | None:
        return at_hand.pop(0) if at_hand else None

    threads: ParkingThreads[int] = ParkingThreads(
        run, max_idle=4, idle_timeout=30, next_job=next_job
    )
    threads.start(1, name="threadserve test")
    for _ in range(3):
        assert done.acquire(timeout=SETTLE)
    wait_until(lambda: threads.idle == 1, what="the thread to park once nothing is at hand")
    assert [job for job, _ in ran] == [1, 2, 3]
    assert len({ident for _, ident in ran}) == 1, "a job at hand ran on another thread"
    assert (threads.started, threads.reused) == (1, 2)
    threads.close()
    wait_until(lambda: not _parked(), what="the parked thread to end at close")


def test_a_finishing_thread_takes_a_waiting_client_and_the_server_registers_it() -> None:
    # Bound, never served: no accept loop competes for the client. The
    # direct accept's own rules are tested in test_accept.py.
    server = RunningServer(echo, "127.0.0.1:0")
    try:
        with socket.create_connection(server.tcp_address, timeout=SETTLE) as client:
            server._acceptor.loop_ran_at = time.monotonic() - 2 * ACCEPT_LOOP_LAG
            # Retried: connect() can return before the client reaches the queue.
            conn = wait_for_value(server._acceptor.take_next_client, "the client to be taken")
            try:
                assert conn.peer == "{}:{}".format(*client.getsockname())
                assert conn in server._registry.live, "the connection was not registered"
                assert server.statistics().connections_accepted == 1
            finally:
                conn._close_socket()
                server._unregister(conn, "test over")
        assert server.statistics().connections_active == 0
        with socket.create_connection(server.tcp_address, timeout=SETTLE):
            server._request_stop()
            assert server._acceptor.take_next_client() is None, "taken after a stop request"
    finally:
        server.stop()
