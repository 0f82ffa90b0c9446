"""The registry on its own (_registry.py): live connections, stop groups and counts.

Connections here are real ``Connection`` objects on socket pairs, never
served: the registry only reads their stop group, client address and byte
counts. The server-level behaviour (statistics, the stop) is tested through
the Server elsewhere; these pin down what each step changes.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest
from support import SETTLE

from threadserve._admission import Admission
from threadserve._connection import Connection
from threadserve._events import CloseReason, RejectReason, StopOutcome
from threadserve._registry import Registry
from threadserve._timeouts import Timeouts


class Pairs:
    """Socket pairs for the test's connections, all closed at the end."""

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []
        # A stop descriptor nobody writes to: these connections are never stopped.
        self._stop_r, self._stop_w = os.pipe()

    def connection(self, ip: str | None = "10.0.0.1", group: int = 0) -> Connection:
        ours, theirs = socket.socketpair()
        self._sockets += [ours, theirs]
        return Connection(
            ours,
            f"{ip}:1",
            stop_fd=self._stop_r,
            timeouts=Timeouts(),
            client_ip=ip,
            stop_group=group,
        )

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    made = Pairs()
    try:
        yield made
    finally:
        made.close()


def admitted(
    registry: Registry, pairs: Pairs, ip: str | None = "10.0.0.1", group: int = 0
) -> Connection:
    """A connection counted in and added, as the server does for a new client."""
    assert registry.count_in(ip) is None
    conn = pairs.connection(ip, group)
    registry.add(conn)
    return conn


def test_a_connection_goes_in_is_served_and_leaves(pairs: Pairs) -> None:
    registry = Registry(Admission(10, None, "wait"))
    first = admitted(registry, pairs, group=2)
    second = admitted(registry, pairs, group=2)
    third = admitted(registry, pairs, group=5)
    assert registry.live == {first: None, second: None, third: None}
    assert (registry.group_live[2], registry.group_live[5], sum(registry.group_live)) == (2, 1, 3)
    assert registry.accepted == 3

    thread = threading.current_thread()
    registry.serve(first, thread)
    assert registry.live[first] is thread

    assert registry.remove(first, CloseReason.COMPLETED, 0.25, None) == 2
    assert registry.remove(third, CloseReason.TIMEOUT, 0.5, None) == 1
    assert list(registry.live) == [second]
    assert (registry.group_live[2], registry.group_live[5]) == (1, 0)
    assert registry.closed == 2
    assert registry.counters.closed[CloseReason.COMPLETED] == 1
    assert registry.counters.closed[CloseReason.TIMEOUT] == 1
    assert registry.counters.connection_durations.count == 2


def test_leaving_frees_the_admission_slot(pairs: Pairs) -> None:
    registry = Registry(Admission(1, None, "wait"))
    conn = admitted(registry, pairs)
    assert registry.count_in("10.0.0.2") == ("over max_connections=1", RejectReason.MAX_CONNECTIONS)
    registry.remove(conn, CloseReason.COMPLETED, 0.0, None)
    assert registry.count_in("10.0.0.2") is None
    assert (registry.accepted, registry.rejected) == (2, 1)


def test_refusals_are_counted_by_reason() -> None:
    registry = Registry(Admission(10, 1, "wait"))
    assert registry.count_in("10.0.0.1") is None
    refusal = registry.count_in("10.0.0.1")
    assert refusal is not None
    assert refusal[1] is RejectReason.MAX_CONNECTIONS_PER_IP
    registry.count_refused(RejectReason.STOPPING, 4)
    assert registry.rejected == 5
    assert registry.counters.rejected[RejectReason.MAX_CONNECTIONS_PER_IP] == 1
    assert registry.counters.rejected[RejectReason.STOPPING] == 4
    assert registry.counters.rejected[RejectReason.MAX_CONNECTIONS] == 0


def test_bytes_are_counted_once_whether_live_or_closed(pairs: Pairs) -> None:
    registry = Registry(Admission(10, None, "wait"))
    staying, leaving = admitted(registry, pairs), admitted(registry, pairs)
    staying.bytes_received, staying.bytes_sent = 10, 20
    leaving.bytes_received, leaving.bytes_sent = 100, 200
    assert registry.bytes_moved() == (110, 220)
    registry.remove(leaving, CloseReason.COMPLETED, 0.0, None)
    assert registry.bytes_moved() == (110, 220)
    staying.bytes_received += 1  # A live connection's bytes are read as they grow.
    assert registry.bytes_moved() == (111, 220)


def test_a_proxied_client_is_counted_under_the_address_its_proxy_reported(pairs: Pairs) -> None:
    registry = Registry(Admission(10, 1, "wait"))
    # Clients of a proxy are admitted with no address, then moved to theirs.
    conn, other = admitted(registry, pairs, ip=None), admitted(registry, pairs, ip=None)
    assert registry.readmit(conn, "192.0.2.7") is None
    assert conn._client_ip == "192.0.2.7"
    assert registry.readmit(other, "192.0.2.7") == "over max_connections_per_ip=1 for 192.0.2.7"
    assert other._client_ip is None
    assert registry.counters.rejected[RejectReason.MAX_CONNECTIONS_PER_IP] == 1
    # Leaving frees the address it was moved to.
    registry.remove(conn, CloseReason.COMPLETED, 0.0, None)
    assert registry.readmit(other, "192.0.2.7") is None


def test_a_stop_is_counted() -> None:
    registry = Registry(Admission(10, None, "wait"))
    registry.count_stop(StopOutcome.FORCED, 1.5)
    assert registry.counters.stops == {StopOutcome.CLEAN: 0, StopOutcome.FORCED: 1}
    assert registry.counters.stop_durations.count == 1


def test_threads_remain_while_a_connection_lives_or_its_thread_runs(pairs: Pairs) -> None:
    registry = Registry(Admission(10, None, "wait"))
    assert not registry.threads_remain()
    conn = admitted(registry, pairs)
    assert registry.threads_remain()

    release = threading.Event()
    thread = threading.Thread(target=release.wait, args=(SETTLE,))
    thread.start()
    try:
        registry.remove(conn, CloseReason.COMPLETED, 0.0, thread)
        assert registry.threads_remain(), "its thread still runs"
    finally:
        release.set()
        thread.join(SETTLE)
    assert not thread.is_alive()
    assert not registry.threads_remain()
