"""The lock every write to a connection takes, cheap when nobody else wants it.

``Connection.sendall`` runs once per reply, and almost always with no other
thread writing to the same connection. A ``threading.Lock`` costs as much as
a system call to take and give back (measured here: about 240 ns of CPU for
an acquire and a release on this busy machine, as much as ``os.getpid()``),
which is a tenth of a small echo's whole round trip
(``python -m bench.write_lock``).

So the lock is a list holding one token. Taking it is ``free.pop()``,
giving it back ``free.append(True)``: each one C call, atomic in CPython
(under the GIL, and under the list's own lock on free-threaded builds),
together about a third of the ``threading.Lock`` pair. Only a thread that
finds the list empty goes the slow way: it waits on a condition, and a
releaser wakes it only if ``waiters`` says someone waits. The condition is
made by the first thread that has to wait (making one costs several
microseconds, and most connections never contend for their writes).

Why no wake-up is lost: a waiter counts itself in ``waiters`` and then tries
the list again, both under the condition's lock, and only then waits. A
releaser puts the token back first and reads ``waiters`` after. Either the
releaser reads the count after the waiter raised it, and then notifies
under the condition's lock (which the waiter only gives up inside ``wait``),
or it reads it before, and then the token was back before the waiter's own
second try, which takes it.

The hot path (``sendall``) uses ``free`` directly; everything else calls the
methods.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

# Makes a lock's condition once when two threads first need it at the same time.
_CONDITION_MAKING = threading.Lock()


class WriteLock:
    """A non-reentrant mutex: ``free`` holds one token while nobody holds the lock."""

    __slots__ = ("_condition", "free", "waiters")

    def __init__(self) -> None:
        self.free = [True]
        self.waiters = 0
        self._condition: threading.Condition | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free at once."""
        try:
            self.free.pop()
        except IndexError:
            return False
        return True

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock, waiting at most ``timeout`` seconds (None: as long as it takes)."""
        free = self.free
        try:
            free.pop()
            return True
        except IndexError:
            pass
        deadline = None if timeout is None else time.monotonic() + timeout
        condition = self._contended()
        with condition:
            self.waiters += 1
            try:
                while True:
                    try:
                        free.pop()
                        return True
                    except IndexError:
                        pass
                    if deadline is None:
                        condition.wait()
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return False
                        condition.wait(remaining)
            finally:
                self.waiters -= 1

    def release(self) -> None:
        """Give the lock back; only its holder may, and only once."""
        self.free.append(True)
        if self.waiters:
            self.wake_one()

    def wake_one(self) -> None:
        """Wake one waiter (called by a releaser that saw ``waiters``)."""
        # A waiter made the condition before it counted itself in ``waiters``.
        condition = self._contended()
        with condition:
            condition.notify()

    def _contended(self) -> threading.Condition:
        """The condition waiters wait on, made on first use."""
        condition = self._condition
        if condition is None:
            with _CONDITION_MAKING:
                condition = self._condition
                if condition is None:
                    condition = self._condition = threading.Condition(threading.Lock())
        return condition

    def locked(self) -> bool:
        return not self.free

    def __enter__(self) -> WriteLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
