"""SIGHUP's two meanings: the terminal went away, or "reload".

A terminal that closes (its window shut, an ssh session dropped) sends
SIGHUP to the processes in front of it; ``kill -HUP`` and service managers
(systemd's ``ExecReload=kill -HUP $MAINPID``) send the same signal to ask a
server to reload. Left at its default action, SIGHUP ends a process at once:
no goodbye, every connection reset, which breaks the stop contract.

The command line tells the two apart by the terminal itself. A terminal that
has hung up answers every request on it with EIO, so ``isatty`` turns false
on a descriptor that was a terminal when the process started (checked on
this machine with a pseudo-terminal whose other end closed). Then SIGHUP
means the terminal went away, and the server stops gracefully, as for
SIGTERM; otherwise it reloads.

A process started with SIGHUP ignored (``nohup``) asked to outlive its
terminal: threadserve leaves the signal ignored there, so it neither stops nor
reloads on it.
"""

from __future__ import annotations

import os
import signal

#: The descriptors whose terminal, if any, a hang-up closes.
STANDARD_DESCRIPTORS = (0, 1, 2)


class TerminalWatch:
    """Which standard descriptors were terminals at the start, to see them hang up later."""

    def __init__(self, fds: tuple[int, ...] = STANDARD_DESCRIPTORS) -> None:
        self._terminals = tuple(fd for fd in fds if os.isatty(fd))

    @property
    def attached(self) -> bool:
        """Whether any of them was a terminal when this was made."""
        return bool(self._terminals)

    def hung_up(self) -> bool:
        """True once a descriptor that was a terminal is no longer one (its terminal is gone)."""
        return any(not os.isatty(fd) for fd in self._terminals)


def sighup_ignored() -> bool:
    """Whether this process was started with SIGHUP ignored (``nohup``), and still has it so."""
    return signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
