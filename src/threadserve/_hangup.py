"""SIGHUP's two meanings: the terminal hung up, or "reload".

SIGHUP is the signal a terminal sends when it goes away (its window shut, an
ssh session dropped): the kernel sends it to the session leader, and a shell
passes it on to its jobs. A daemon has no terminal, so nothing would ever
send it that; daemons took the free signal to mean "reload", and service
managers send it so (systemd's ``ExecReload=kill -HUP $MAINPID``). Left at its
default action, SIGHUP ends a process at once: no goodbye, every connection
reset, which breaks the stop contract either way.

threadserve follows that history, decided once at the start:

- a process with a controlling terminal stops gracefully on SIGHUP, as on
  SIGTERM (the Server's own signal handling, _signals.py);
- a process without one reloads on it (the command line: the supervisor's
  workers, or one process's successor, see _upgrade.py);
- a process started with SIGHUP ignored (``nohup``) asked to outlive its
  terminal, and keeps it ignored.

Deciding at the start rather than at each signal is deliberate: a closing
terminal's SIGHUP may come before or after the terminal reads as hung up
(a terminal emulator may signal the shell first, and the shell its jobs),
so looking at the terminal when the signal comes would reload on some
hang-ups and stop on some reloads. "A controlling terminal" includes a
server started from a terminal session in the background, or in a
container run with a terminal (``docker run -t``); ``setsid`` starts one
without.

Only the command line reloads. A ``Server`` in a program of its own, with no
terminal, leaves SIGHUP at its default action: install a handler that calls
``server.stop()`` from another thread if SIGHUP should stop it.
"""

from __future__ import annotations

import functools
import os
import signal


@functools.cache
def has_controlling_terminal() -> bool:
    """Whether this process has a controlling terminal (``/dev/tty`` opens only then).

    Asked once per process, so the command line and the Server decide alike.
    Non-blocking: a serial line waiting for its carrier must not hold the start.
    """
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        # ENXIO: no controlling terminal. Anything else (no descriptor left,
        # say) cannot be told apart, and no terminal is the safe reading:
        # SIGHUP then keeps the meaning a service manager gives it.
        return False
    os.close(fd)
    return True


def sighup_ignored() -> bool:
    """Whether SIGHUP is ignored in this process (started under ``nohup``, say)."""
    return signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def sighup_reloads() -> bool:
    """Whether SIGHUP should mean "reload" here: not ignored, and no terminal to hang up."""
    return not sighup_ignored() and not has_controlling_terminal()


def sighup_stops() -> bool:
    """Whether SIGHUP should stop gracefully here: at its default action, in a terminal.

    At its default only: a handler installed before (the command line's
    reload, or the application's own) keeps it.
    """
    return signal.getsignal(signal.SIGHUP) is signal.SIG_DFL and has_controlling_terminal()
