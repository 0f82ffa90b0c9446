"""The stop sequence on its own (_stop.py), driven without a Server.

The stop contract itself is tested through the Server in test_stop.py;
these check the sequence's interface: what it does with the parts it is
given, and what it reports back through its callbacks.
"""

from __future__ import annotations

import select
import threading
import weakref
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import pytest
from support import SETTLE, connect, recv_until_eof

from threadserve._broadcast import MAX_GROUPS, StopBroadcast
from threadserve._connection import Connection
from threadserve._events import StopOutcome
from threadserve._listeners import Listener, open_listeners, parse_bind_address
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
class Calls:
    """What the sequence told its server."""

    stop_accepting: int = 0
    dismissed: list[int] = field(default_factory=list)
    stops: list[StopOutcome] = field(default_factory=list)


@dataclass
class Parts:
    sequence: StopSequence
    listener: Listener
    calls: Calls


@pytest.fixture
def parts(request: pytest.FixtureRequest) -> Iterator[Parts]:
    owns_queue: bool = getattr(request, "param", True)
    (bound,) = open_listeners([parse_bind_address("127.0.0.1:0")])
    listener = Listener(bound.socket, bound.bind_address, owns_queue=owns_queue)
    broadcast = StopBroadcast()
    calls = Calls()

    def stop_accepting() -> None:
        calls.stop_accepting += 1

    sequence = StopSequence(
        lock=threading.Lock(),
        connections={},
        group_live=[0] * MAX_GROUPS,
        finishing=weakref.WeakSet(),
        listeners=[listener],
        threads=ParkingThreads[Connection](lambda conn: None),
        broadcast=broadcast,
        wait=poll_wait,
        forced=lambda: False,
        on_stop_accepting=stop_accepting,
        count_dismissed=calls.dismissed.append,
        count_stop=lambda outcome, duration: calls.stops.append(outcome),
    )
    try:
        yield Parts(sequence, listener, calls)
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
        connections={},
        group_live=[0] * MAX_GROUPS,
        finishing=weakref.WeakSet(),
        listeners=[],
        threads=ParkingThreads[Connection](lambda conn: None),
        broadcast=broadcast,
        wait=poll_wait,
        forced=lambda: False,
        on_stop_accepting=lambda: None,
        count_dismissed=lambda n: None,
        count_stop=lambda outcome, duration: None,
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
    assert parts.calls == Calls(stop_accepting=1, dismissed=[1], stops=[StopOutcome.CLEAN])
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
    assert parts.calls.dismissed == []
    assert parts.calls.stop_accepting == 1
    queued.settimeout(SETTLE)
    try:
        told = recv_until_eof(queued)
    except ConnectionResetError:
        told = b""  # Its only listener closed: the kernel resets it.
    assert NOTICE not in told
    queued.close()
