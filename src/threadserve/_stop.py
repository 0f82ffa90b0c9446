"""How one server process stops: the stop sequence and its report.

Theory of operation
===================

The stop runs once, in the serving thread (whoever called ``serve_forever``),
after the accept loop has returned. It never waits without a deadline: every
wait is the serving thread's poll on the server's control pipe, which signal
handlers, ``stop()`` and ending connections write to, so a second Ctrl-C or
the last connection leaving is heard at once.

1. Refuse new clients. A listener that owns its kernel queue first drops new
   SYNs (``Listener.refuse_new_clients``), so no new client lands in the
   queue after it was emptied (a handshake under way at that instant may
   still complete, and the close then resets it: a window of one round
   trip); then the clients still waiting there are accepted and
   told (notice, FIN, then a lingering close: their sockets are watched in
   this thread's waits); then every listener closes and a new connect is
   refused. A queue that other processes go on serving (a supervisor's
   shared listener) is theirs, so it is not emptied here.
2. Parked connection threads end, since no connection comes any more, and
   the server's ``on_stop_accepting`` runs (a worker tells its supervisor,
   systemd hears STOPPING=1).
3. Wake in waves. ``stopping`` is set under the server's lock, then the
   ``begun`` event that busy connections check, in that order: a connection
   that sees ``begun`` must also see ``stopping``, or it would close without
   the goodbye. Connections are woken one stop group at a time: the group's
   stop descriptor becomes readable (see _broadcast.py), so a blocked
   reader wakes, gets what had already arrived, then end-of-stream; and
   every member's cancel token is set, its hooks run on a thread of their
   own so that one that blocks cannot hold up the stop. The next group goes
   once fewer than STOP_WAVE woken connections are still finishing:
   thousands of threads woken at once would only queue for the GIL.
4. Drain. Handlers finish the work they had read and return; each
   connection thread writes the goodbye notice, sends FIN and hands its
   socket to this thread (``take_over_linger``), which lingers for the
   client's EOF in its own waits, until just before the grace deadline at
   the latest (the server's ``_finish_connection`` reads ``stopping`` and
   ``deadline``); the connection's thread ends at once. Lingering for
   thousands of clients in one epoll costs a system call per client; in
   their own threads it cost each of them one more sleep and one more wait
   for the GIL. This thread waits until the registry is empty and every
   lingering client has left or run out of time, the grace deadline
   passes, or the stop is forced.
5. Force what is left. A connection still lingering has had its notice and
   FIN: closing it counts as drained. Any other is forced
   (``shutdown(SHUT_RDWR)`` wakes any socket call) and counted as forced.
   A thread that still has not ended FORCE_MARGIN later is stuck in a call
   that ignores its token: it is logged with its stack and abandoned (a
   daemon thread does not keep the process alive).
6. Threads that left the registry but had their last lines to run are
   joined, and the cancel-hook thread too; then the ``StopReport`` is made,
   counted and logged.

The registry (_registry.py: live connections, live count per stop group,
the counts) belongs to the server and changes under its lock; this module
reads it and counts what the stop did under that lock, and does its socket
I/O outside it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from ._broadcast import StopBroadcast
from ._cancel import CallbackRunner, CancelCallback
from ._connection import DEFAULT_CHUNK_SIZE, Connection, queued_bytes
from ._events import RejectReason, StopOutcome
from ._listeners import LISTEN_BACKLOG, Listener
from ._logging import counted
from ._registry import Registry
from ._threads import ParkingThreads

logger = logging.getLogger("threadserve")

#: After forcing, how long stuck threads get to notice before they are reported.
FORCE_MARGIN = 0.25
#: At stop, wake the next group of connections once fewer than this many of
#: those already woken are still finishing (see _broadcast.py).
STOP_WAVE = 32


@dataclass(frozen=True)
class StopReport:
    """How a stop went. ``clean`` is False when anything had to be forced."""

    clean: bool
    drained: int
    forced: int
    stuck_threads: tuple[str, ...]
    duration: float


#: ``wait(timeout, fds)``: the serving thread's wait on its control pipe, for
#: up to ``timeout`` seconds, also watching ``fds``; returns those readable.
Wait = Callable[[float, Collection[int]], list[int]]


class StopSequence:
    """The stop of one server, run once from its serving thread (see above).

    It is given the parts of the server it works on: the lock and the
    registry under it (_registry.py), the listeners, the parked threads and
    the stop broadcast. ``wait`` is the serving thread's wait (see
    ``Wait``), and ``forced`` says whether a forced stop was asked for. What
    the stop did (clients dismissed, its outcome) is counted in the registry.

    The connection side reads ``stopping``, ``begun`` and ``deadline``, and
    calls ``connection_left`` under the lock whenever a connection ends.

    Resource handling: clients taken from the listen queue are closed by
    ``run`` before it returns; the listeners are closed by ``run`` too. The
    registry, pipes and stop descriptors stay the server's to release.
    """

    def __init__(
        self,
        *,
        lock: threading.Lock,
        registry: Registry,
        listeners: Sequence[Listener],
        threads: ParkingThreads[Connection],
        broadcast: StopBroadcast,
        wait: Wait,
        forced: Callable[[], bool],
        on_stop_accepting: Callable[[], object],
    ) -> None:
        self._lock = lock
        self._registry = registry
        self._listeners = listeners
        self._threads = threads
        self._broadcast = broadcast
        self._wait = wait
        self._forced = forced
        self._on_stop_accepting = on_stop_accepting
        #: Set under the lock once the connections are about to be woken.
        self.stopping = False
        # Busy connections watch this; idle ones wait for their wave (_connection.py).
        self.begun = threading.Event()
        #: The grace deadline (time.monotonic()), once the stop has begun.
        self.deadline = 0.0
        # Cancel hooks run here at stop, off the stopping thread (see _cancel.py).
        self.hook_runner = CallbackRunner("threadserve cancel hooks")
        # During a stop, a connection thread wakes the serving thread once the
        # live count falls to this (-1: only when the last one ends).
        self._wake_at_live = -1
        # Clients told of the stop, their FIN sent, waiting for their EOF
        # (by descriptor): those from the listen queue, and served ones whose
        # threads handed them over (take_over_linger). Changed under the lock.
        self._dismissed: dict[int, socket.socket] = {}
        # When to stop waiting for each, in the order they came, which is
        # also the order of their deadlines (each is min(now + linger, a
        # fixed bound)); entries of sockets closed since are skipped.
        self._linger_deadlines: collections.deque[tuple[float, socket.socket]] = collections.deque()
        # Their descriptors, watched through one epoll descriptor in this
        # thread's waits: no poller rebuilt over thousands on every wait.
        self._linger_poll: select.epoll | None = None
        self._taking_over = False  # take_over_linger accepts sockets (under the lock).

    def connection_left(self, live: int) -> bool:
        """Whether a connection that just ended, leaving ``live``, should wake the serving thread.

        Called under the lock. While stopping, the serving thread is woken
        when there is room for the next wave, and when the last one ends.
        """
        if not self.stopping:
            return False
        if live <= self._wake_at_live:
            self._wake_at_live = -1  # One wake-up per wave is enough.
            return True
        return not live

    def run(self, *, grace: float, linger: float, notice: bytes | None) -> StopReport:
        """Stop within ``grace`` seconds, then force; return the report.

        ``linger`` bounds the wait for told listen-queue clients' EOF, and
        ``notice`` is what they are told (None: only a clean EOF).
        """
        started = time.monotonic()
        self.deadline = started + grace
        linger_until = self.linger_until(started, linger)  # For listen-queue clients.
        self._linger_poll = select.epoll()
        with self._lock:
            self._taking_over = True
        # A queue that other processes go on serving (a supervisor's shared
        # listener) is not ours to dismiss: its clients are theirs. Ours stop
        # taking new clients first, so that none lands in the queue between
        # its emptying and the close (which would reset it).
        for listener in self._listeners:
            if listener.owns_queue:
                listener.refuse_new_clients()
        queued = sum(
            self._dismiss_listen_queue(listener, notice, linger_until)
            for listener in self._listeners
            if listener.owns_queue
        )
        for listener in self._listeners:
            listener.close()
        # No connection comes any more: parked threads end now, and threads
        # that finish from here on end instead of parking.
        self._threads.close()
        self._on_stop_accepting()
        logger.info(
            "stopping: %s, grace %.1f s; %d waiting in the listen queue were told",
            counted(len(self._registry.live), "connection"),
            grace,
            queued,
            extra={"event": "stopping"},
        )
        with self._lock:
            self.stopping = True
            connections = dict(self._registry.live)
        # Only now: a connection that sees this must also see stopping, or it
        # would close without the goodbye notice (Server._finish_connection).
        self.begun.set()
        self._wake_in_waves(connections)
        self._wait_for_connections(self.deadline)
        with self._lock:
            # From here on a connection thread lingers in its own time (and
            # is closed below like the others still lingering).
            self._taking_over = False
        self._close_dismissed()
        with self._lock:
            # A connection still in its lingering close has had its notice and
            # FIN: cutting the linger short is not forcing it.
            lingering = [conn for conn in self._registry.live if conn._lingering]
            leftover = {c: t for c, t in self._registry.live.items() if not c._lingering}
        for conn in lingering:
            conn._force_close()
        stuck: list[str] = []
        if leftover:
            logger.warning(
                "%s: forcing %d connections: %s",
                "stop forced" if self._forced() else "grace period over",
                len(leftover),
                ", ".join(c.peer for c in leftover),
            )
            for conn in leftover:
                conn._force_close()
            # Forced sockets wake their threads at once; give them a moment to end.
            self._wait_for_connections(time.monotonic() + FORCE_MARGIN, until_forced=False)
            stuck = self._report_stuck_threads(leftover)
        # A thread leaves the registry a few lines before it ends, and parked
        # threads (woken by _threads.close() above) have only their last lines
        # to run; wait for those, so no thread outlives the stop (stuck ones
        # aside). None of them is stuck, but on a loaded machine hundreds can
        # take longer than FORCE_MARGIN to get the GIL: they get until the
        # grace deadline, unless the stop was forced.
        hooks_deadline = time.monotonic() + FORCE_MARGIN
        join_deadline = hooks_deadline
        if not self._forced():
            join_deadline = max(join_deadline, self.deadline)
        with self._lock:
            finishing = list(self._registry.finishing)
        # Only those still running: after a stop of thousands, nearly all have
        # ended, and joining each ended one again took 75 ms for 10,000.
        running = set(threading.enumerate())
        for thread in finishing:
            if thread in running:
                thread.join(max(0.0, join_deadline - time.monotonic()))
        stuck_hook = self.hook_runner.close(max(0.0, hooks_deadline - time.monotonic()))
        if stuck_hook is not None:
            stuck.append(_report_stuck_hook(*stuck_hook))
        self._linger_poll.close()
        duration = time.monotonic() - started
        report = StopReport(
            clean=not leftover,
            drained=len(connections) - len(leftover),
            forced=len(leftover),
            stuck_threads=tuple(stuck),
            duration=duration,
        )
        outcome = StopOutcome.CLEAN if report.clean else StopOutcome.FORCED
        with self._lock:
            self._registry.count_stop(outcome, duration)
        logger.info(
            "stopped in %.3f s: %d drained, %d forced",
            duration,
            report.drained,
            report.forced,
            extra={"event": "stopped", "duration": duration, "reason": outcome.value},
        )
        return report

    def _wake_in_waves(self, connections: dict[Connection, threading.Thread | None]) -> None:
        """Set every token and wake every reader, a group at a time (see _broadcast.py)."""
        by_group: dict[int, list[Connection]] = {}
        for conn in connections:
            by_group.setdefault(conn._stop_group, []).append(conn)
        unreleased = sorted(by_group)
        while unreleased:
            group = unreleased.pop(0)
            self._broadcast.release(group)
            for conn in by_group[group]:
                conn.cancel_token.cancel("server stopping", self.hook_runner)
            if unreleased and not self._wait_for_wave_room(unreleased):
                break  # Deadline or a forced stop: wake the rest at once.
        for group in unreleased:
            for conn in by_group[group]:
                conn.cancel_token.cancel("server stopping", self.hook_runner)
        self._broadcast.release_all()

    def _wait_for_wave_room(self, unreleased: list[int]) -> bool:
        """Wait until fewer than STOP_WAVE woken connections are still finishing."""

        def room_for_a_wave() -> bool:
            waiting = sum(self._registry.group_live[group] for group in unreleased)
            if len(self._registry.live) - waiting < STOP_WAVE:
                return True
            # Not yet: have the connection threads wake us when there is.
            self._wake_at_live = waiting + STOP_WAVE // 2
            return False

        try:
            return self._wait_until(room_for_a_wave, self.deadline)
        finally:
            with self._lock:
                self._wake_at_live = -1

    def _dismiss_listen_queue(
        self, listener: Listener, notice: bytes | None, linger_until: float
    ) -> int:
        """Tell the clients still waiting in the listen queue, instead of resetting them.

        Closing a listener resets every connection the kernel had completed
        but we had not accepted yet. They were never served, so nothing they
        sent was read; they only need to know. Each gets the notice and a FIN,
        then a lingering close like a served connection's (see _wait_until):
        a client that sends just after being told must not turn our close
        into a reset that destroys the notice. Bounded by the backlog size.
        """
        dismissed = 0
        if listener.reuse_port:
            # Other sockets in its SO_REUSEPORT group stay open, and the
            # kernel goes on hashing new clients to this one until it closes:
            # those landing after our last accept would be reset. A backlog
            # of 0 leaves them waiting on their SYN instead; their retry
            # reaches a listener that is still open.
            with contextlib.suppress(OSError):
                listener.socket.listen(0)
        for _ in range(LISTEN_BACKLOG):
            try:
                sock, _address = listener.accept()
            except OSError:
                break  # Empty (EAGAIN), or out of descriptors: the rest get the reset.
            _tell(sock, notice)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                sock.close()  # Already gone: nothing to linger for.
            else:
                with self._lock:
                    self._linger_for(sock, linger_until)
            dismissed += 1
        with self._lock:
            self._registry.count_refused(RejectReason.STOPPING, dismissed)
        return dismissed

    def linger_until(self, now: float, linger: float) -> float:
        """When a client told at ``now`` stops being waited for: ``linger`` later at most.

        Lingering ends just before the grace deadline, so that a client that
        never closes does not turn a clean drain into a forced one.
        """
        return min(now + linger, self.deadline - FORCE_MARGIN / 2)

    def take_over_linger(self, sock: socket.socket, until: float) -> bool:
        """Linger for a told client here, until its EOF or ``until``; False: linger yourself.

        Called by a connection thread once its notice and FIN are sent (plain
        TCP: the waits here read with ``MSG_DONTWAIT``, which a TLS socket
        refuses). From True on, the socket is this sequence's to close.
        """
        with self._lock:
            if not self._taking_over:
                return False
            self._linger_for(sock, until)
        return True

    def _linger_for(self, sock: socket.socket, until: float) -> None:
        """Watch a told client for its EOF until ``until`` (the lock is held)."""
        assert self._linger_poll is not None
        fd = sock.fileno()
        self._dismissed[fd] = sock
        self._linger_deadlines.append((until, sock))
        self._linger_poll.register(fd, select.EPOLLIN)

    def _discard_from_dismissed(self, fd: int) -> None:
        with self._lock:
            sock = self._dismissed.get(fd)
        if sock is None:
            return  # Closed since the epoll reported it.
        try:
            if sock.recv(DEFAULT_CHUNK_SIZE, socket.MSG_DONTWAIT):
                return  # Input dropped (never read); its EOF is still to come.
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass  # Reset: the client is gone.
        self._stop_lingering(fd, sock)

    def _stop_lingering(self, fd: int, sock: socket.socket) -> None:
        with self._lock:
            del self._dismissed[fd]
        sock.close()  # Which also takes it out of the epoll: nothing else holds it open.

    def _close_expired_lingerers(self) -> float | None:
        """Close told clients whose time is up; return the next one's deadline (None: none)."""
        now = time.monotonic()
        deadlines = self._linger_deadlines
        while deadlines:
            until, sock = deadlines[0]
            fd = sock.fileno()
            if fd < 0:
                deadlines.popleft()  # Closed already (its EOF came).
            elif until <= now:
                deadlines.popleft()
                self._stop_lingering(fd, sock)
            else:
                return until
        return None

    def _close_dismissed(self) -> None:
        with self._lock:
            dismissed = list(self._dismissed.values())
            self._dismissed.clear()
            self._linger_deadlines.clear()
        for sock in dismissed:
            sock.close()

    def _wait_for_connections(self, deadline: float, until_forced: bool = True) -> None:
        self._wait_until(
            lambda: not self._registry.live and not self._dismissed, deadline, until_forced
        )

    def _wait_until(
        self, done: Callable[[], bool], deadline: float, until_forced: bool = True
    ) -> bool:
        """Wait on the control pipe until ``done()`` holds; it is called under the lock.

        Returns True when it holds, False at the deadline or, with
        ``until_forced``, once the stop is forced. The told clients lingering
        here are watched in these waits too: the stop's waits are the only
        time they need.
        """
        while True:
            next_expiry = self._close_expired_lingerers()
            with self._lock:
                if done():
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (until_forced and self._forced()):
                return False
            if next_expiry is not None:
                remaining = min(remaining, next_expiry - time.monotonic())
            watch = [] if self._linger_poll is None else [self._linger_poll.fileno()]
            if self._wait(max(0.0, remaining), watch) and self._linger_poll is not None:
                for fd, _events in self._linger_poll.poll(0):
                    self._discard_from_dismissed(fd)

    def _report_stuck_threads(
        self, leftover: dict[Connection, threading.Thread | None]
    ) -> list[str]:
        stuck = []
        with self._lock:
            # Still registered: a thread that unregistered is only finishing.
            still_there = [(c, t) for c, t in leftover.items() if c in self._registry.live]
        for _conn, thread in still_there:
            if thread is None or not thread.is_alive():
                continue  # Never picked up by a thread, or already gone.
            stuck.append(thread.name)
            logger.error(
                "thread %r did not stop within the grace period (its handler did not "
                "return after the cancel, or a blocking cancel callback kept its own "
                "from running); abandoning it. Stack:\n%s",
                thread.name,
                _stack_of(thread),
            )
            # Its socket is already shut down; closing it here would free the
            # descriptor number while that thread may still use it.
        return stuck


def _report_stuck_hook(thread: threading.Thread, callback: CancelCallback | None) -> str:
    logger.error(
        "cancel callback %r did not return; abandoning it. Stack:\n%s", callback, _stack_of(thread)
    )
    return thread.name


def _stack_of(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    return "".join(traceback.format_stack(frame)).rstrip() if frame else "(no stack)"


def _tell(sock: socket.socket, notice: bytes | None) -> None:
    """One line to a client that gets no thread (a listen-queue client at stop, or one turned away).

    Unread input would turn the close into a reset that can destroy the
    notice in flight, so what the client already sent is read and dropped
    first (it was never served, so nothing read is lost). The notice is tiny
    and fits the empty send buffer: no waiting. This also runs on the accept
    loop, where every system call counts (each one hands the GIL to a busy
    connection thread): usually one ioctl and one send.
    """
    try:
        for _ in range(16):  # Bounded: a client streaming at us gets the reset.
            if not queued_bytes(sock.fileno()) or not sock.recv(
                DEFAULT_CHUNK_SIZE, socket.MSG_DONTWAIT
            ):
                break
        if notice:
            sock.send(notice, socket.MSG_DONTWAIT)
    except OSError:
        pass  # The client already left, or its buffer is full: nothing more to tell it.
