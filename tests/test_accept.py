"""The Acceptor on its own: the accept loop, finishing threads' direct accepts, the wait pause.

Each test builds an Acceptor around a real listener on loopback, a real
Admission and a control pipe, with an ``admit`` that does what the server's
does with its lock and counts (end the accept, admit, resume if room) and
keeps the accepted sockets instead of making connections of them.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from support import SETTLE, wait_for_value, wait_until

from threadserve._accept import ACCEPT_LOOP_LAG, Acceptor, _select_timeout
from threadserve._admission import Admission
from threadserve._listeners import Listener, open_listeners, parse_bind_address


@dataclass
class Rig:
    """An Acceptor and what it was given, with a record of what it did."""

    listener: Listener
    lock: threading.Lock
    admission: Admission
    control: tuple[int, int]
    acceptor: Acceptor[socket.socket] = field(init=False)
    admitted: list[socket.socket] = field(default_factory=list)
    dispatched: list[socket.socket] = field(default_factory=list)
    refused: int = 0
    stop_requested: bool = False

    def admit(self, sock: socket.socket, address: object, family: int) -> socket.socket | None:
        refusal = self.acceptor.settle(self.admission.admit, None)
        if refusal is not None:
            self.refused += 1
            sock.close()
            return None
        self.admitted.append(sock)
        return sock

    def release(self) -> None:
        """One admitted client leaves, as a connection ending does in the server."""
        with self.lock:
            self.admission.release(None)
            wake = self.acceptor.paused
        self.admitted.pop(0).close()
        if wake:
            self.wake()

    def wake(self) -> None:
        os.write(self.control[1], b"\0")

    def wait_control(self, timeout: float) -> None:
        select.select([self.control[0]], [], [], timeout)

    def lagging(self) -> None:
        """As if the accept loop had not run for a while: direct accepts may take clients."""
        self.acceptor.loop_ran_at = time.monotonic() - 2 * ACCEPT_LOOP_LAG

    def client(self) -> socket.socket:
        """A client the kernel has connected, waiting in the listen queue."""
        host, port = self.listener.socket.getsockname()[:2]
        client = socket.create_connection((host, port), timeout=SETTLE)
        # connect() can return before the server's side reaches the queue.
        readable, _, _ = select.select([self.listener.socket], [], [], SETTLE)
        assert readable, "the client never reached the listen queue"
        return client

    def take(self) -> socket.socket:
        """A direct accept that must take a client (retried while its connect is under way)."""
        return wait_for_value(self.acceptor.take_next_client, "a direct accept to take a client")


def _rig(max_connections: int = 100, policy: str = "wait") -> Iterator[Rig]:
    listener = open_listeners([parse_bind_address("127.0.0.1:0")])[0]
    control = os.pipe()
    for fd in control:
        os.set_blocking(fd, False)
    rig = Rig(listener, threading.Lock(), Admission(max_connections, None, policy), control)
    rig.acceptor = Acceptor(
        lock=rig.lock,
        admission=rig.admission,
        listeners=[listener],
        control_fd=control[0],
        admit=rig.admit,
        dispatch=rig.dispatched.append,
        wake=rig.wake,
        wait_control=rig.wait_control,
        stop_requested=lambda: rig.stop_requested,
    )
    try:
        yield rig
    finally:
        for sock in rig.admitted:
            sock.close()
        listener.close()
        for fd in control:
            os.close(fd)


@pytest.fixture
def rig() -> Iterator[Rig]:
    yield from _rig()


@pytest.fixture
def one_slot() -> Iterator[Rig]:
    yield from _rig(max_connections=1)


@pytest.fixture
def one_slot_reject() -> Iterator[Rig]:
    yield from _rig(max_connections=1, policy="reject")


# ---------------------------------------------------------------- direct accepts


def test_a_direct_accept_takes_a_waiting_client_once_the_loop_lags(rig: Rig) -> None:
    rig.lagging()
    assert rig.acceptor.take_next_client() is None, "nobody is waiting yet"
    assert rig.acceptor.under_way == 0, "an accept that found nobody kept its place"
    with rig.client() as client:
        taken = rig.take()
        assert taken.getpeername() == client.getsockname()
    assert rig.admitted == [taken]
    assert rig.dispatched == [], "a direct accept serves the client itself: no dispatch"
    assert rig.acceptor.under_way == 0


def test_no_direct_accept_while_the_loop_keeps_up(rig: Rig) -> None:
    with rig.client():
        # As if the loop had just run (and will have for a while yet).
        rig.acceptor.loop_ran_at = time.monotonic() + SETTLE
        assert rig.acceptor.take_next_client() is None
        assert rig.admitted == []
        rig.lagging()
        rig.take()


def test_no_direct_accept_once_a_stop_is_requested(rig: Rig) -> None:
    rig.lagging()
    rig.stop_requested = True
    with rig.client():
        assert rig.acceptor.take_next_client() is None
        assert rig.admitted == []
        rig.stop_requested = False  # The client was there to be taken.
        rig.take()


def test_under_the_wait_policy_a_full_server_leaves_clients_in_the_queue(one_slot: Rig) -> None:
    rig = one_slot
    rig.lagging()
    with rig.client(), rig.client():
        rig.take()
        # The only slot is taken: the second client waits in the queue
        # instead of being turned away.
        assert rig.acceptor.take_next_client() is None
        assert rig.refused == 0
        assert rig.acceptor.paused
        rig.release()
        rig.take()
    assert rig.refused == 0


def test_an_accept_that_takes_nobody_gives_its_place_back_and_wakes_a_paused_loop(
    one_slot: Rig,
) -> None:
    rig = one_slot
    # An accept under way holds the only place, so the loop would pause.
    assert rig.acceptor.begin(direct=True)
    with rig.lock:
        rig.acceptor.update_paused()
    assert rig.acceptor.paused
    rig.acceptor.failed()
    assert rig.acceptor.under_way == 0
    assert not rig.acceptor.paused
    assert os.read(rig.control[0], 16), "the paused loop was not woken to resume"


def test_handed_over_accepting_takes_no_client_any_more(rig: Rig) -> None:
    rig.lagging()
    rig.acceptor.hand_over()
    with rig.client():
        assert rig.acceptor.take_next_client() is None
        assert not rig.acceptor.begin()
    assert rig.acceptor.paused
    assert rig.admitted == []


def test_a_resource_error_is_counted_and_logged(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.acceptor.resource_error("accept on %s failed: %s", "here", "Too many open files")
    assert rig.acceptor.errors == 1
    assert "accept on here failed: Too many open files" in caplog.text


def test_the_loop_sleeps_for_the_back_off_and_no_later_than_the_drain_s_end() -> None:
    assert _select_timeout(0.0, None) is None, "no back-off, no drain: wait for an event"
    assert _select_timeout(0.5, None) == 0.5
    assert _select_timeout(0.5, time.monotonic() + 60) == 0.5
    assert 50 < (_select_timeout(0.0, time.monotonic() + 60) or 0) <= 60
    assert _select_timeout(0.5, time.monotonic() - 1) == 0.0, "the drain is over: look now"


def test_close_direct_waits_for_a_direct_accept_under_way(rig: Rig) -> None:
    assert rig.acceptor.begin(direct=True)
    closed = threading.Event()

    def close() -> None:
        rig.acceptor.close_direct(SETTLE)
        closed.set()

    closer = threading.Thread(target=close)
    closer.start()
    try:
        wait_until(lambda: rig.acceptor._direct_closed, what="close_direct to begin")
        # It waits for the accept under way: a while without it returning
        # (a broken close_direct returns at once) ...
        assert not closed.wait(0.2)
        with rig.lock:
            rig.acceptor.end()
        # ... and returns once that accept ends, well before its own timeout.
        assert closed.wait(SETTLE / 2), "close_direct was not woken by the end of the accept"
    finally:
        closer.join(SETTLE)
    assert not rig.acceptor.begin(direct=True), "a direct accept after close_direct"
    assert rig.acceptor.begin(), "the loop's own accepts are not closed by it"


# ---------------------------------------------------------------- the loop


def _run_loop(rig: Rig, until: Callable[[], bool], what: str) -> None:
    """Run the loop in a thread until ``until()`` holds, then end it."""
    done = threading.Event()

    def keep_going() -> bool:
        return not done.is_set()

    loop = threading.Thread(target=rig.acceptor.run, args=(keep_going, lambda: None))
    loop.start()
    try:
        wait_until(until, what=what)
    finally:
        done.set()
        rig.wake()
        loop.join(SETTLE)
    assert not loop.is_alive(), "the loop did not end once keep_going said so"


def test_the_loop_accepts_and_dispatches_every_waiting_client(rig: Rig) -> None:
    clients = [rig.client() for _ in range(5)]
    try:
        _run_loop(rig, lambda: len(rig.dispatched) == 5, "5 clients dispatched")
        assert rig.dispatched == rig.admitted
        served = sorted(sock.getpeername() for sock in rig.dispatched)
        assert served == sorted(client.getsockname() for client in clients)
    finally:
        for client in clients:
            client.close()


def test_the_loop_pauses_when_full_and_resumes_when_a_client_leaves(one_slot: Rig) -> None:
    rig = one_slot
    done = threading.Event()
    loop = threading.Thread(target=rig.acceptor.run, args=(lambda: not done.is_set(), lambda: None))
    first, second = rig.client(), rig.client()
    loop.start()
    try:
        wait_until(lambda: len(rig.dispatched) == 1, what="the first client dispatched")
        wait_until(lambda: rig.acceptor.paused, what="the loop to pause at max_connections")
        assert len(rig.dispatched) == 1
        assert rig.refused == 0
        rig.release()
        wait_until(lambda: len(rig.dispatched) == 2, what="the second client after a release")
        assert rig.refused == 0
    finally:
        done.set()
        rig.wake()
        loop.join(SETTLE)
        first.close()
        second.close()
    assert not loop.is_alive()


def test_under_the_reject_policy_a_full_server_turns_clients_away(one_slot_reject: Rig) -> None:
    rig = one_slot_reject
    first, second = rig.client(), rig.client()
    try:
        _run_loop(rig, lambda: rig.refused == 1, "the second client turned away")
        assert not rig.acceptor.paused
        assert len(rig.admitted) == 1
    finally:
        first.close()
        second.close()
