"""The switch interval grows with the number of connection threads, and comes back."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator

import pytest
from support import SETTLE, wait_until

from threadserve import _gil, echo
from threadserve.testing import running_server


@pytest.fixture(autouse=True)
def _own_interval() -> Iterator[None]:
    """Each test starts from the default interval and no counted threads, and leaves it so."""
    before = sys.getswitchinterval()
    assert _gil.live_threads() == 0
    yield
    wait_until(lambda: _gil.live_threads() == 0, what="connection threads to be counted out")
    sys.setswitchinterval(before)


def test_target_is_the_base_until_many_threads_then_50_us_each_up_to_a_second() -> None:
    assert _gil.target_interval(0, 0.005) == 0.005
    assert _gil.target_interval(100, 0.005) == 0.005
    assert _gil.target_interval(1_000, 0.005) == pytest.approx(0.05)
    assert _gil.target_interval(10_000, 0.005) == pytest.approx(0.5)
    assert _gil.target_interval(100_000, 0.005) == 1.0
    assert _gil.target_interval(10, 0.2) == 0.2  # Never below the process's own.


def test_the_interval_rises_with_threads_and_is_restored_when_they_leave() -> None:
    base = sys.getswitchinterval()
    _gil.threads_changed(+2_000)
    try:
        assert sys.getswitchinterval() == pytest.approx(0.1)
        # Small moves do not touch it (hysteresis).
        _gil.threads_changed(+100)
        assert sys.getswitchinterval() == pytest.approx(0.1)
        _gil.threads_changed(+4_000)
        assert sys.getswitchinterval() == pytest.approx(0.305)
    finally:
        _gil.threads_changed(-6_100)
    assert sys.getswitchinterval() == base


def test_an_interval_the_process_set_itself_is_left_alone() -> None:
    _gil.threads_changed(+2_000)
    try:
        sys.setswitchinterval(0.002)  # The application's own choice, after ours.
        _gil.threads_changed(+10)
        # Taken as the new base: raised from there, and restored to it.
        assert sys.getswitchinterval() == pytest.approx(0.1005)
    finally:
        _gil.threads_changed(-2_010)
    assert sys.getswitchinterval() == 0.002


def test_threads_that_leave_during_a_raise_still_get_the_interval_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The count falls to zero after a raise read it, before the raise is recorded."""
    base, set_interval = sys.getswitchinterval(), sys.setswitchinterval
    leaving: list[threading.Thread] = []

    def raise_while_they_leave(value: float) -> None:
        set_interval(value)
        if value > base and not leaving:
            thread = threading.Thread(target=_gil.threads_changed, args=(-2_000,))
            leaving.append(thread)
            thread.start()
            # Counted out (without the lock, which this raise holds).
            wait_until(lambda: _gil.live_threads() == 0, what="the threads to be counted out")

    monkeypatch.setattr(sys, "setswitchinterval", raise_while_they_leave)
    _gil.threads_changed(+2_000)
    leaving[0].join(SETTLE)
    assert not leaving[0].is_alive()
    assert sys.getswitchinterval() == base


def test_a_server_counts_its_connections_in_and_out() -> None:
    with running_server(echo) as server:
        clients = [socket.create_connection(server.tcp_address, timeout=SETTLE) for _ in range(3)]
        wait_until(lambda: server.statistics().connections_active == 3, what="3 connections")
        # Counted just after the connection is registered, outside the
        # server's lock: the count may trail connections_active for a moment.
        wait_until(
            lambda: _gil.live_threads() == 3, what="3 threads counted", state=_gil.live_threads
        )
        for client in clients:
            client.close()
        wait_until(lambda: _gil.live_threads() == 0, what="the count to fall back")


def test_a_server_can_leave_the_interval_alone() -> None:
    with running_server(echo, adapt_switch_interval=False) as server:
        client = socket.create_connection(server.tcp_address, timeout=SETTLE)
        wait_until(lambda: server.statistics().connections_active == 1, what="a connection")
        assert _gil.live_threads() == 0
        client.close()
