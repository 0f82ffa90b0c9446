"""Log a repeating event at most once a second, with a count of what was held back.

A flood of rejected clients or a run of EMFILE errors must not turn into a
flood of log lines: that would cost more than the event itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping


class RateLimitedLog:
    """One recurring message; ``emit`` logs it at most every ``interval`` seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._level = level
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next_allowed = float("-inf")
        self._suppressed = 0

    def emit(self, message: str, *args: object, extra: Mapping[str, object] | None = None) -> bool:
        """Log now if allowed (and say how many were held back); return whether it logged.

        ``extra`` goes to the log call: the fields of ``--log-format json``.
        """
        now = self._clock()
        with self._lock:
            if now < self._next_allowed:
                self._suppressed += 1
                return False
            self._next_allowed = now + self._interval
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            message += " (%d more like this in the last %.0f s)"
            args = (*args, suppressed, self._interval)
        self._logger.log(self._level, message, *args, extra=extra)
        return True
