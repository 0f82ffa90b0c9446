"""The pid file (``--pid-file``): which process to signal.

A service manager or an operator reads it to find the process that takes
SIGTERM, SIGHUP and SIGUSR2. After an upgrade (and a one-process reload) that
is another process (see _upgrade.py), so the file is rewritten at the moment
of the handover, by the old process, before it stops anything: there is
never a moment when the file names a process that has already left.

The file is written whole or not at all (a temporary file renamed over it),
so a reader never sees a half-written number. A process removes the file
at exit only while it still names that process: a supervisor that handed
over must not delete its successor's file.
"""

from __future__ import annotations

import contextlib
import os

from ._exceptions import ConfigurationError


def write_pid_file(path: str, pid: int) -> None:
    """Write ``pid`` to ``path`` atomically; ConfigurationError if the folder is not writable."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="ascii") as file:
            file.write(f"{pid}\n")
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ConfigurationError(f"cannot write the pid file {path!r}: {exc.strerror}") from exc


def read_pid_file(path: str) -> int | None:
    """The pid in ``path``, or None when it is missing or does not hold a number."""
    try:
        with open(path, encoding="ascii") as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return None


def remove_pid_file(path: str, pid: int) -> None:
    """Remove ``path`` if it still names ``pid`` (another process may have taken it over)."""
    if read_pid_file(path) == pid:
        with contextlib.suppress(OSError):
            os.unlink(path)
