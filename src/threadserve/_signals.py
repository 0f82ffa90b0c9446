"""SIGINT and SIGTERM: the first one stops gracefully, the second forces.

Only the main thread receives signals in Python, and a handler runs between
two bytecodes of whatever the main thread was doing, possibly while it holds
a lock. So the callbacks given here must not take locks: the server's only
set a flag and write a byte to a pipe.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from types import FrameType

logger = logging.getLogger("threadserve")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals(
    request_stop: Callable[[], None],
    request_force: Callable[[], None],
    grace: Callable[[], float],
) -> Iterator[None]:
    """Install the handlers for the duration of the block, then restore the old ones."""
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

    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: the old handler was installed from C and cannot be put
            # back from Python; the default is the closest we can do.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
