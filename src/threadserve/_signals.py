"""SIGINT and SIGTERM: the first one stops gracefully, the second forces.

SIGHUP too, in a process with a controlling terminal where nothing else
handles it (see _hangup.py): it stops gracefully, and never forces, since a
terminal that closes may send it twice (a server run as a shell's job gets
it from the shell, and again from the kernel when the shell exits). A
SIGINT or SIGTERM after it forces.

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

from ._hangup import sighup_stops

logger = logging.getLogger("threadserve")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals(
    request_stop: Callable[[], None],
    request_force: Callable[[], None],
    grace: Callable[[], float],
    wakeup_fd: int,
) -> Iterator[None]:
    """Stop on SIGINT/SIGTERM (and SIGHUP in a terminal) for the block (see ``signals_handled``)."""
    received = 0
    first = ""  # The signal that began the stop.

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal received, first
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP and received:
            logger.info("SIGHUP ignored: stopping already")  # Never forces.
            return
        received += 1
        if received == 1:
            first = name
            force = "SIGTERM or SIGINT forces" if first == "SIGHUP" else "send it again to force"
            logger.warning(
                "%s received: stopping gracefully (grace %.1f s); %s", name, grace(), force
            )
            request_stop()
        else:
            again = "after SIGHUP" if received == 2 and first == "SIGHUP" else "again"
            logger.warning("%s received %s: forcing the stop now", name, again)
            request_force()

    signums = (*STOP_SIGNALS, signal.SIGHUP) if sighup_stops() else STOP_SIGNALS
    with signals_handled(signums, on_signal, wakeup_fd):
        yield


def signal_name(signum: int) -> str:
    """A signal's name for the log; one with no name (a real-time one) as "signal 40"."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


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
