"""The stop broadcast: how blocked readers learn that the server is stopping.

Every connection polls one *stop descriptor* next to its socket. Making that
descriptor readable wakes every reader polling it; it is never drained, so it
stays readable and later reads see the stop at once.

Waking ten thousand threads with one descriptor makes them all fight for the
GIL together, and CPython's GIL hand-off degrades far worse than linearly
with the number of waiting threads (measured here: 1,000 threads woken at once
finish in ~0.14 s, 10,000 in several seconds). So connections are spread over
descriptors, and the server wakes them a group at a time, starting the next
group when the previous one is mostly done.

Smaller groups cost less CPU per woken connection, down to a point: a stop of
10,000 idle connections (SIGTERM to exit, the server pinned to one core, runs
alternated, 6 rounds, medians) took 1.35 s with groups of 256 (a new group
once fewer than 128 were finishing), 1.03 s with groups of 64 (32), and the
same within the noise with groups of 32 (16) or 64 (64). Fewer threads
runnable at once make fewer hand-offs of the GIL per connection (voluntary
context switches per run: about 60,000 against 40,000). The price is a
descriptor per 64 connections.

What a descriptor is: on Linux an eventfd (one descriptor per group). Where
``os.eventfd`` does not exist (macOS, the BSDs) it is a pipe: readers poll
its read end, one byte written to the write end wakes them, and nobody ever
reads that byte, so the read end stays readable exactly as a never-drained
eventfd does. A pipe costs two descriptors per group instead of one.
``THREADSERVE_FORCE_PIPE_BROADCAST=1`` (or ``StopBroadcast(use_pipe=True)``)
takes the pipe on Linux too, so the suite runs the fallback where it runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

#: Connections per group, roughly: a connection joins the group its arrival
#: fills, counting the connections alive at that moment.
GROUP_SIZE = 64
#: At most this many groups (descriptors); beyond, the last group grows.
MAX_GROUPS = 256
#: Set to 1 (true, yes, on) to use pipes even where eventfd exists.
FORCE_PIPE_VARIABLE = "THREADSERVE_FORCE_PIPE_BROADCAST"


def pipes_wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether stop descriptors are pipes here: no eventfd, or the fallback is forced."""
    forced = environ.get(FORCE_PIPE_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")
    return forced or not hasattr(os, "eventfd")


class StopBroadcast:
    """A growing set of stop descriptors (eventfds, or pipes), one per group of connections.

    Descriptors are created only as concurrency first needs them: a server
    that never holds more than 64 connections uses one, and its descriptor
    count does not creep up with churn. ``use_pipe``: None decides by
    platform and ``THREADSERVE_FORCE_PIPE_BROADCAST``; True or False decides.
    """

    def __init__(self, use_pipe: bool | None = None) -> None:
        self.use_pipe = pipes_wanted() if use_pipe is None else use_pipe
        # Per group: the descriptor readers poll, and the one written to wake
        # them (the same eventfd twice, or a pipe's two ends).
        self._ends: list[tuple[int, int]] = []
        self._fds: list[int] = []  # The read ends, by group.
        self._add_group()

    @property
    def kind(self) -> str:
        return "pipe" if self.use_pipe else "eventfd"

    def _add_group(self) -> None:
        ends = _new_pipe() if self.use_pipe else (fd := _new_eventfd(), fd)
        self._ends.append(ends)
        self._fds.append(ends[0])

    def assign(self, live_connections: int) -> tuple[int, int]:
        """(group, descriptor to poll) for a connection arriving among ``live_connections``."""
        group = min(live_connections // GROUP_SIZE, MAX_GROUPS - 1)
        while group >= len(self._fds):
            try:
                self._add_group()
            except OSError:
                group = len(self._fds) - 1  # Out of descriptors: join the last group.
        return group, self._fds[group]

    def release(self, group: int) -> None:
        """Wake every reader of ``group``; it stays woken for good."""
        _read_end, write_end = self._ends[group]
        if self.use_pipe:
            # A full pipe (64 KiB of releases) is readable already.
            with contextlib.suppress(BlockingIOError):
                os.write(write_end, b"\0")
        else:
            os.eventfd_write(write_end, 1)

    def release_all(self) -> None:
        for group in range(len(self._fds)):
            self.release(group)

    def close(self) -> None:
        for ends in self._ends:
            for fd in dict.fromkeys(ends):  # An eventfd is both ends: close it once.
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._ends = []
        self._fds = []


def _new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _new_pipe() -> tuple[int, int]:
    # os.pipe() descriptors are close-on-exec (not inheritable) already.
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    return read_end, write_end
