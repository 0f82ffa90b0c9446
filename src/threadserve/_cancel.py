"""Cancel tokens: how a handler learns that its connection must wind down.

A token is set once, by the server (stop, deadline) or by the handler itself.
Socket reads on the connection notice a stop on their own; a handler doing
other blocking work (a database query, a sleep, a queue ``get``) can check
``cancelled``, wait on the token, or register a callback that interrupts that
work (close a cursor, put a sentinel on a queue).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable

logger = logging.getLogger("threadserve")

CancelCallback = Callable[[], object]


class CancelToken:
    """A one-shot, thread-safe flag with callbacks.

    Callbacks run once, in registration order: in the thread that cancels,
    or on a ``CallbackRunner`` when one is given (the server's stop does so,
    so a callback that blocks cannot hold the stop past its grace period). A
    callback registered after the token was cancelled runs at once in the
    registering thread. Exceptions from callbacks are logged, never raised to
    the canceller (one bad hook must not stop the server from stopping).
    """

    __slots__ = ("_callbacks", "_event", "_lock", "_reason")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Made by the first ``wait``: every connection has a token, few are
        # ever waited on, and a ``threading.Event`` (a Condition around a
        # lock) costs some microseconds to make, a fair share of a short
        # connection's whole cost.
        self._event: threading.Event | None = None
        self._callbacks: list[CancelCallback] = []
        self._reason: str | None = None  # Set (never to None) by the one cancel.

    @property
    def cancelled(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """Why the token was cancelled (``"server stopping"``, ...), or None."""
        return self._reason

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled or ``timeout`` seconds pass; return ``cancelled``."""
        with self._lock:
            if self._reason is not None:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def on_cancel(self, callback: CancelCallback) -> Callable[[], None]:
        """Run ``callback`` when the token is cancelled; return a function that unregisters it."""
        with self._lock:
            if self._reason is None:
                self._callbacks.append(callback)
                return lambda: self._remove(callback)
        _run_callback(callback)
        return lambda: None

    def cancel(self, reason: str = "cancelled", runner: CallbackRunner | None = None) -> bool:
        """Set the token and run its callbacks (here, or on ``runner``).

        Returns False if the token was already set.
        """
        with self._lock:
            if self._reason is not None:
                return False
            self._reason = reason
            if self._event is not None:
                self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        # Run outside the lock: a callback may register or remove other callbacks.
        for callback in callbacks:
            if runner is None:
                _run_callback(callback)
            else:
                runner.submit(callback)
        return True

    def _remove(self, callback: CancelCallback) -> None:
        # ValueError: already run or already removed; removing twice is harmless.
        with self._lock, contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def __repr__(self) -> str:
        state = f"cancelled ({self._reason})" if self.cancelled else "active"
        return f"<CancelToken {state}>"


class CallbackRunner:
    """Runs cancel callbacks in order on a thread of its own, started on first use.

    A callback that blocks delays the callbacks queued behind it, never the
    thread that cancelled. ``close`` says which callback, if any, did not return.
    """

    def __init__(self, thread_name: str) -> None:
        self.thread_name = thread_name
        self._queue: queue.SimpleQueue[CancelCallback | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._running: CancelCallback | None = None

    def submit(self, callback: CancelCallback) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()
        self._queue.put(callback)

    def close(self, timeout: float) -> tuple[threading.Thread, CancelCallback | None] | None:
        """Let queued callbacks finish for up to ``timeout`` seconds.

        Returns None when all returned, else the runner's thread (left to
        run as a daemon) and the callback it is stuck in.
        """
        if self._thread is None:
            return None
        self._queue.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return None
        return self._thread, self._running

    def _run(self) -> None:
        while (callback := self._queue.get()) is not None:
            self._running = callback
            _run_callback(callback)
            self._running = None
            del callback  # Do not keep its closure alive while waiting.


def _run_callback(callback: CancelCallback) -> None:
    try:
        callback()
    except Exception:
        logger.exception("cancel callback %r raised", callback)
