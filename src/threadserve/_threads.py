"""Connection threads that outlive their connection.

A thread per connection costs a ``Thread.start()`` (a clone, plus waiting
until the new thread runs) and a thread exit: 150-200 µs here, more than a
short connection's whole exchange. So a connection thread whose handler has
returned does not end: it *parks*, waiting for the next accepted connection,
and the accept loop hands new connections to parked threads before starting
any. A parked thread holds no connection, no socket and no admission slot.
Before parking, a thread asks ``next_job`` for work at hand (the server
accepts a waiting client for it): a job taken that way needs no hand-off.

Bounds: at most ``max_idle`` threads park at once (a thread finishing beyond
that ends at once), and a parked thread that gets no connection for
``idle_timeout`` seconds ends, so a burst's threads do not stay for good.
``close()`` (at stop) ends every parked thread and keeps finishing ones from
parking.

The hand-off is one ``SimpleQueue`` shared by the parked threads. ``idle``
counts parked threads nobody has claimed yet; the accept loop claims one
(under the lock) before it puts a connection on the queue, so every item put
has a thread waiting for it. A parked thread that times out leaves only if an
unclaimed one is left to leave: otherwise a connection is already on its way.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

#: What the threads run: a connection, in the server's case.
Job = TypeVar("Job")

DEFAULT_MAX_IDLE = 256
DEFAULT_IDLE_TIMEOUT = 10.0
PARKED_NAME = "threadserve idle"


class ParkingThreads(Generic[Job]):
    """Threads that run ``run(job)``, then park for the next job instead of ending."""

    def __init__(
        self,
        run: Callable[[Job], object],
        *,
        max_idle: int = DEFAULT_MAX_IDLE,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        next_job: Callable[[], Job | None] | None = None,
    ) -> None:
        self._run = run
        # Asked for a job before parking: one at hand needs no hand-off.
        self._next_job = next_job
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._idle = 0  # Parked and not yet claimed by a hand-off.
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._closed = False
        self.started = 0  # Threads started, for statistics and tests.
        self.reused = 0  # Jobs handed to a parked thread.

    @property
    def idle(self) -> int:
        """Parked threads waiting for a job right now."""
        return self._idle

    def hand_off(self, job: Job) -> bool:
        """Give ``job`` to a parked thread; False when none is parked (start one instead)."""
        with self._lock:
            if not self._idle:
                return False
            self._idle -= 1
            self.reused += 1
        self._jobs.put(job)
        return True

    def start(self, job: Job, name: str) -> None:
        """Run ``job`` on a new thread. Raises RuntimeError when no thread can be started."""
        thread = threading.Thread(target=self._serve, args=(job,), name=name, daemon=True)
        # Counted before the start: once started, the thread may serve its
        # job and finish before this one gets the GIL back, and statistics
        # read by then must already include it.
        with self._lock:
            self.started += 1
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self.started -= 1
            raise

    def close(self) -> None:
        """End every parked thread; threads still running a job end when it is done."""
        with self._lock:
            self._closed = True
            parked, self._idle = self._idle, 0
        for _ in range(parked):
            self._jobs.put(None)

    def _serve(self, job: Job | None) -> None:
        while job is not None:
            self._run(job)
            # Hold no reference to the finished job while parked.
            job = None
            if self._next_job is not None:
                job = self._next_job()
            if job is None:
                job = self._park()
            else:
                with self._lock:
                    self.reused += 1

    def _park(self) -> Job | None:
        with self._lock:
            if self._closed or self._idle >= self.max_idle:
                return None
            self._idle += 1
        threading.current_thread().name = PARKED_NAME
        while True:
            try:
                return self._jobs.get(timeout=self.idle_timeout)
            except queue.Empty:
                with self._lock:
                    if self._idle:
                        self._idle -= 1
                        return None
                # Every parked thread is claimed: a job (or, after close(),
                # a None) is already on its way to one of us. Take it.
