"""SIGINT and SIGTERM: the first one stops gracefully, the second forces.

Only the main thread runs Python signal handlers, and a handler runs between
two bytecodes of whatever the main thread was doing, possibly while it holds
a lock. So the callbacks given here must not take locks: the server's only
set a flag and write a byte to a pipe.

The kernel, though, hands a signal sent to the process to any thread that
does not block it, and with a thousand connection threads that is not always
the main one. Python's C-level handler then runs in that thread and only
marks the signal as pending; the main thread, asleep in the accept loop's wait
(which has no timeout), would never wake to run the Python handler, and the
server would serve on. So the signal's arrival is also written to a wake-up
descriptor (``signal.set_wakeup_fd``), the server's control pipe, which that
wait watches; whichever thread caught the signal, the main thread wakes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterable, Iterator
from types import FrameType

logger = logging.getLogger("threadserve")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals(
    request_stop: Callable[[], None],
    request_force: Callable[[], None],
    grace: Callable[[], float],
    wakeup_fd: int,
) -> Iterator[None]:
    """Stop on SIGINT/SIGTERM for the duration of the block (see ``signals_handled``)."""
    received = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        name = signal.Signals(signum).name
        if received == 1:
            logger.warning(
                "%s received: stopping gracefully (grace %.1f s); send it again to force",
                name,
                grace(),
            )
            request_stop()
        else:
            logger.warning("%s received again: forcing the stop now", name)
            request_force()

    with signals_handled(STOP_SIGNALS, on_signal, wakeup_fd):
        yield


@contextlib.contextmanager
def signals_handled(
    signums: Iterable[int], handler: Callable[[int, FrameType | None], object], wakeup_fd: int
) -> Iterator[None]:
    """Route ``signums`` to ``handler`` and signal arrivals to ``wakeup_fd``, for the block.

    ``wakeup_fd`` (non-blocking) gets a byte whenever a signal arrives, in
    whichever thread (see above). The previous handlers and wake-up
    descriptor of the process are put back at the end.
    """
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    # A full pipe already means "wake up": nothing to warn about.
    previous_wakeup_fd = signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_wakeup_fd)
        for signum, old in previous.items():
            # None: the old handler was installed from C and cannot be put
            # back from Python; the default is the closest we can do.
            signal.signal(signum, signal.SIG_DFL if old is None else old)
