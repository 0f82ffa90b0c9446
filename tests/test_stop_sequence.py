"""The stop sequence on its own (_stop.py), driven without a Server.

The stop contract itself is tested through the Server in test_stop.py;
these check the sequence's interface: what it does with the parts it is
given, and what it counts in the registry.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import pytest
from support import SETTLE, connect, recv_until_eof

from threadserve._admission import Admission
from threadserve._broadcast import StopBroadcast
from threadserve._connection import Connection
from threadserve._events import RejectReason, StopOutcome
from threadserve._listeners import Listener, open_listeners, parse_bind_address
from threadserve._registry import Registry
from threadserve._stop import StopReport, StopSequence
from threadserve._threads import ParkingThreads

NOTICE = b"Shutting down!\n"


def poll_wait(timeout: float, watch: Collection[int]) -> list[int]:
    """The serving thread's wait, minus the control pipe: nobody wakes it early."""
    poller = select.poll()
    for fd in watch:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _events in poller.poll(int(timeout * 1000) + 1)]


@dataclass
class Parts:
    sequence: StopSequence
    listener: Listener
    registry: Registry
    stop_accepting_calls: list[None]

    def counted(self) -> tuple[int, dict[RejectReason, int], dict[StopOutcome, int]]:
        """What the stop counted: refusals in all, per reason, and stop outcomes."""
        counters = self.registry.counters
        return self.registry.rejected, counters.rejected, counters.stops


def empty_registry() -> Registry:
    return Registry(Admission(100, None, "wait"))


@pytest.fixture
def parts(request: pytest.FixtureRequest) -> Iterator[Parts]:
    owns_queue: bool = getattr(request, "param", True)
    (bound,) = open_listeners([parse_bind_address("127.0.0.1:0")])
    listener = Listener(bound.socket, bound.bind_address, owns_queue=owns_queue)
    broadcast = StopBroadcast()
    registry = empty_registry()
    stop_accepting_calls: list[None] = []
    sequence = StopSequence(
        lock=threading.Lock(),
        registry=registry,
        listeners=[listener],
        threads=ParkingThreads[Connection](lambda conn: None),
        broadcast=broadcast,
        wait=poll_wait,
        forced=lambda: False,
        on_stop_accepting=lambda: stop_accepting_calls.append(None),
    )
    try:
        yield Parts(sequence, listener, registry, stop_accepting_calls)
    finally:
        listener.close()
        broadcast.close()


def run_in_background(sequence: StopSequence) -> tuple[threading.Thread, list[StopReport]]:
    reports: list[StopReport] = []
    thread = threading.Thread(
        target=lambda: reports.append(sequence.run(grace=SETTLE, linger=SETTLE, notice=NOTICE))
    )
    thread.start()
    return thread, reports


def test_connection_left_wakes_the_serving_thread_only_once_stopping() -> None:
    broadcast = StopBroadcast()
    sequence = StopSequence(
        lock=threading.Lock(),
        registry=empty_registry(),
        listeners=[],
        threads=ParkingThreads[Connection](lambda conn: None),
        broadcast=broadcast,
        wait=poll_wait,
        forced=lambda: False,
        on_stop_accepting=lambda: None,
    )
    # While serving, a connection ending wakes nobody (the accept loop has
    # its own reason to wake: a paused accept).
    assert not sequence.connection_left(0)
    sequence.stopping = True
    assert not sequence.connection_left(3)
    assert sequence.connection_left(0)
    broadcast.close()


def test_an_empty_registry_stops_clean_and_its_queue_is_told(parts: Parts) -> None:
    # Completed by the kernel, never accepted: it waits in the listen queue.
    address = parts.listener.socket.getsockname()
    queued = connect(address)
    queued.sendall(b"never served")
    thread, reports = run_in_background(parts.sequence)
    # The sequence lingers for this client's EOF, so it ends once we close.
    assert recv_until_eof(queued) == NOTICE
    queued.close()
    thread.join(SETTLE)
    assert not thread.is_alive()
    (report,) = reports
    assert report.clean
    assert (report.drained, report.forced, report.stuck_threads) == (0, 0, ())
    assert parts.stop_accepting_calls == [None]
    rejected, per_reason, stops = parts.counted()
    assert rejected == 1
    assert per_reason == {**dict.fromkeys(RejectReason, 0), RejectReason.STOPPING: 1}
    assert stops == {**dict.fromkeys(StopOutcome, 0), StopOutcome.CLEAN: 1}
    assert parts.sequence.stopping
    assert parts.sequence.begun.is_set()
    # The listener is closed: a new client is refused.
    assert parts.listener.socket.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        connect(address)


@pytest.mark.parametrize("parts", [False], indirect=True)
def test_a_queue_other_processes_serve_is_not_emptied(parts: Parts) -> None:
    queued = connect(parts.listener.socket.getsockname())
    thread, reports = run_in_background(parts.sequence)
    thread.join(SETTLE)
    assert not thread.is_alive()
    (report,) = reports
    assert report.clean
    # Not taken from the queue, so not told and not counted: the queue's
    # other owners would have served it.
    rejected, per_reason, _stops = parts.counted()
    assert rejected == 0
    assert not any(per_reason.values())
    assert parts.stop_accepting_calls == [None]
    queued.settimeout(SETTLE)
    try:
        told = recv_until_eof(queued)
    except ConnectionResetError:
        told = b""  # Its only listener closed: the kernel resets it.
    assert NOTICE not in told
    queued.close()
