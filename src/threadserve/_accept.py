"""Taking clients from the listeners: the accept loop, direct accepts, back-off.

Theory of operation
===================

Two kinds of thread accept clients:

- The *accept loop*, in the serving thread, waits in ``select`` on the
  listeners and on the server's control pipe, and accepts up to ACCEPT_BATCH
  clients per wake-up, so that a stop request is heard promptly in a burst.
- A connection thread that has just finished its connection takes the next
  waiting client itself, before it parks (``take_next_client``), but only
  while the accept loop lags (see there for why, and the measurements).

Either one claims a place before its ``accept`` (``begin``) and gives it back
after (``end`` once admission counts the client, ``failed`` if no client
came). Under the wait overload policy those places count towards
``max_connections``: two threads accepting at once never take one free slot
twice, and accepting pauses while the server is full (``paused``), until a
connection ends and wakes the loop. ``hand_over`` pauses it for good, for a
worker giving its shared socket to the others. Before the stop empties and
closes the listeners, ``close_direct`` bars direct accepts and waits for the
ones under way: a descriptor closed under a call in progress could be
reused by the time the call runs.

Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), the loop
stops listening and waits on the control pipe only, for a back-off of 5 ms
doubling to 1 s (Go's net/http backs off the same way), instead of spinning
on a listener that stays readable. Only the loop logs accept errors and
backs off; a direct accept leaves an error for the loop to meet.

State lives under the server's lock, which admission shares: the server's
``admit`` ends the accept and admits the client under one acquisition.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from ._admission import Admission, OverloadPolicy
from ._listeners import Listener
from ._ratelimit import RateLimitedLog

logger = logging.getLogger("threadserve")

#: Accept at most this many clients per wake-up, so the control pipe is heard promptly.
ACCEPT_BATCH = 64
#: A finishing connection thread takes a waiting client itself once the
#: accept loop has not run for this long (see Acceptor.take_next_client).
ACCEPT_LOOP_LAG = 0.002
#: accept() failures that mean "out of a resource": back off instead of spinning.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_FIRST = 0.005
ACCEPT_BACKOFF_MAX = 1.0

#: What an admitted client becomes (the server's Connection).
Client = TypeVar("Client")
#: What ``settle``'s admission step takes, and the verdict it gives.
Arg = TypeVar("Arg")
Verdict = TypeVar("Verdict")


class Acceptor(Generic[Client]):
    """The accepting side of one server (see above).

    It is given the server's lock and admission (whose count, with the
    accepts under way, says when the wait policy pauses accepting), the
    listeners, the control pipe's read end (the server closes it only after
    ``run`` returned), and callbacks into the server:

    - ``admit``: an accepted socket, its peer address and the listener's
      family in; the registered client out, or None once it was turned away
      and closed. It ends the accept with ``settle``, which counts the
      client in (or turns it away) under the same hold of the lock, or, for
      a client it turns away before admission (``proxy_allow``), ``failed``.

    - ``dispatch``: hand an admitted client to a thread.
    - ``wake``: write to the control pipe; ``wait_control``: wait on it (the
      back-off).
    - ``stop_requested``: no direct accepts once it is True.

    The server reads ``paused`` under the lock when a connection ends (a
    paused loop needs a wake-up then) and ``errors`` for its statistics.
    """

    def __init__(
        self,
        *,
        lock: threading.Lock,
        admission: Admission,
        listeners: Sequence[Listener],
        control_fd: int,
        admit: Callable[[socket.socket, object, int], Client | None],
        dispatch: Callable[[Client], object],
        wake: Callable[[], object],
        wait_control: Callable[[float], object],
        stop_requested: Callable[[], bool],
    ) -> None:
        self._lock = lock
        self._admission = admission
        self._listeners = listeners
        self._control_fd = control_fd
        self._admit = admit
        self._dispatch = dispatch
        self._wake = wake
        self._wait_control = wait_control
        self._stop_requested = stop_requested
        # Accepts under way, by the loop or by finishing connection threads,
        # under the lock. Under the wait policy each holds a place below
        # max_connections until its client is admitted.
        self.under_way = 0
        self.paused = False  # At max_connections under the wait policy, or handed over.
        self._handed_over = False  # hand_over() was called.
        self._direct_closed = False
        self._done = threading.Condition(lock)
        # When the loop last ran Python after its select (monotonic):
        # finishing threads accept for themselves only while it lags.
        self.loop_ran_at = 0.0
        self.errors = 0  # Failures for want of a resource, under the lock.
        self._errors_log = RateLimitedLog(logger, logging.ERROR)

    # ------------------------------------------------------------------ the loop

    def run(self, keep_going: Callable[[], bool], until: Callable[[], float | None]) -> None:
        """Accept while ``keep_going()`` says so.

        ``keep_going`` is asked after every wake-up, and ``until()`` says by
        when (monotonic; None: no limit) it must be asked again with no
        wake-up: the end of a stop's drain delay, during which the server
        still accepts and nothing else would wake this loop.
        """
        selector = selectors.DefaultSelector()
        try:
            selector.register(self._control_fd, selectors.EVENT_READ)
            listening = False
            backoff = 0.0
            while keep_going():
                with self._lock:
                    # Under the lock, so a connection ending right now sees
                    # the flag and wakes us (see Server._unregister): no
                    # lost wake-up.
                    self.update_paused()
                if listening == self.paused:
                    listening = not listening
                    for listener in self._listeners:
                        if listening:
                            selector.register(listener.socket, selectors.EVENT_READ, listener)
                        else:
                            selector.unregister(listener.socket)
                for key, _events in selector.select(_select_timeout(backoff, until())):
                    self.loop_ran_at = time.monotonic()
                    if key.data is None:
                        drain_pipe(self._control_fd)
                    elif self._accept_batch(key.data):
                        backoff = 0.0
                    else:
                        backoff = min(max(backoff * 2, ACCEPT_BACKOFF_FIRST), ACCEPT_BACKOFF_MAX)
                if backoff:
                    # Stop listening for a while: only the control pipe wakes us.
                    self._wait_control(backoff)
        finally:
            selector.close()

    def _accept_batch(self, listener: Listener) -> bool:
        """Accept what is waiting; False if accept failed for lack of a resource."""
        for _ in range(ACCEPT_BATCH):
            if not self.begin():
                return True
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                self.failed()
                return True
            except OSError as exc:
                self.failed()
                if exc.errno in RESOURCE_ERRNOS:
                    self.resource_error(
                        "accept on %s failed: %s; pausing accepts (backing off)",
                        listener.address,
                        exc.strerror,
                    )
                    return False
                # ECONNABORTED and friends: that client is gone, the next one is not.
                logger.debug("accept on %s: %s", listener.address, exc)
                continue
            conn = self._admit(sock, address, listener.family)
            if conn is not None:
                self._dispatch(conn)
        return True

    def resource_error(self, message: str, *args: object) -> None:
        """Count a failure for want of a resource (accept, thread start); log it, rate-limited."""
        with self._lock:
            self.errors += 1
        self._errors_log.emit(message, *args)

    # ------------------------------------------------------------------ direct accepts

    def take_next_client(self) -> Client | None:
        """A client from the listen queue for the thread whose connection just ended, if one waits.

        Why: under load the accept loop is the slowest way to a new client.
        Woken from ``select``, it needs the GIL back, and a thread that slept
        gets it last: the busy connection threads returning from their short
        socket calls take it first, again and again. With 50 busy connections
        it got the GIL about every 80 ms and then accepted some 50 queued
        clients at once, each of which then waited once more for the parked
        thread it was handed to. A thread that has just finished a connection
        holds the GIL already: one non-blocking ``accept`` and it serves the
        next client itself, with no hand-off. The accept loop still accepts
        whatever these threads leave, and is the only one to log accept
        errors and back off from them.

        Only while the accept loop lags (it has not run for ACCEPT_LOOP_LAG):
        a finishing thread that accepts serves new clients at the expense of
        the busy ones. The mixed load (50 busy + 50 short-connection
        clients, ``python -m bench --workloads short,mixed --repeats 2``,
        runs alternated on one quiet machine, asyncio in each run for the
        ratios): always on, short connections 0.77x/0.70x asyncio's rate,
        p99 2.4x/2.9x, busy throughput 0.72x/0.70x; at 2 ms, 0.66x/0.67x/
        0.64x, p99 2.7x/3.0x/5.7x, busy 1.08x/1.09x/0.95x; at 1 ms in
        between (busy 0.89x/0.86x). Short connections alone did not tell
        the settings apart (0.89-1.40x asyncio either way).

        Never once a stop is requested or accepting is paused, nor after
        ``close_direct``.
        """
        if self._stop_requested() or time.monotonic() - self.loop_ran_at < ACCEPT_LOOP_LAG:
            return None
        for listener in self._listeners:
            if not self.begin(direct=True):
                return None
            try:
                sock, address = listener.accept()
            except OSError:
                # Nobody waiting, or an error the accept loop will meet and report.
                self.failed()
                continue
            return self._admit(sock, address, listener.family)
        return None

    def close_direct(self, timeout: float) -> None:
        """Bar direct accepts from now on, and wait (up to ``timeout`` s) for those under way.

        An accept under way is one non-blocking system call and an
        admission, so the wait is short; the bound is for a listener someone
        made blocking.
        """
        with self._lock:
            self._direct_closed = True
            self._done.wait_for(lambda: not self.under_way, timeout)

    # ------------------------------------------------------------------ places

    def begin(self, direct: bool = False) -> bool:
        """Claim a place for one accept; False while accepting is paused (or, direct, closed)."""
        with self._lock:
            self.update_paused()
            if self.paused or (direct and self._direct_closed):
                return False
            self.under_way += 1
            return True

    def end(self) -> None:
        """An accept is over (the caller holds the lock): release its place."""
        self.under_way -= 1
        if self._direct_closed and not self.under_way:
            self._done.notify_all()

    def settle(self, count_in: Callable[[Arg], Verdict], arg: Arg) -> Verdict:
        """End an accept that brought a client in; ``count_in(arg)`` admits it, under the lock.

        The accept's place and admission's count change under one hold of
        the lock, so the wait policy never sees the client twice or not at
        all. A client turned away frees its place, which may resume a paused
        loop: it is woken once the lock is let go.
        """
        with self._lock:
            self.end()
            verdict = count_in(arg)
            wake = self.resume_if_room()
        if wake:
            self._wake()
        return verdict

    def failed(self) -> None:
        """An accept brought no client in: give its place back, and wake a loop it kept paused.

        Nobody was waiting, the accept failed, or ``admit`` turned the client
        away before admission counted it (``proxy_allow``).
        """
        with self._lock:
            self.end()
            wake = self.resume_if_room()
        if wake:
            self._wake()

    def resume_if_room(self) -> bool:
        """Recompute the pause (the lock is held); True if the loop must wake to resume."""
        was_paused = self.paused
        self.update_paused()
        return was_paused and not self.paused

    def update_paused(self) -> None:
        """Pause at max_connections under the wait policy; the caller holds the lock."""
        admission = self._admission
        self.paused = self._handed_over or (
            admission.policy is OverloadPolicy.WAIT
            and admission.active + self.under_way >= admission.max_connections
        )

    def hand_over(self) -> None:
        """Accept no more clients, for good (the caller wakes the loop)."""
        self._handed_over = True


def _select_timeout(backoff: float, until: float | None) -> float | None:
    """How long the loop may sleep: the back-off, and no later than ``until``."""
    if until is None:
        return backoff or None
    remaining = max(0.0, until - time.monotonic())
    return min(backoff, remaining) if backoff else remaining


def drain_pipe(fd: int) -> None:
    """Read a non-blocking pipe empty (its bytes are wake-ups, not data)."""
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 4096):
            pass
