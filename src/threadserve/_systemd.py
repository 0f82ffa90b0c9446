"""systemd without libsystemd: socket activation and the notify protocol.

Socket activation: systemd (or ``systemd-socket-activate``) binds the
sockets, then starts us with them as descriptors 3, 4, ... and says so in
the environment: ``LISTEN_PID`` (the process they are meant for: a child
that inherited the variables must not take them), ``LISTEN_FDS`` (how many)
and ``LISTEN_FDNAMES`` (colon-separated names, from ``FileDescriptorName=``).
``--bind fd://3`` picks one by number, ``--bind systemd:NAME`` by name, and
no ``--bind`` at all serves every one handed over. The variables are removed
once read, so worker processes (and anything a handler starts) do not take
the sockets again.

Notify: when ``NOTIFY_SOCKET`` names an AF_UNIX datagram socket (a path, or
``@name`` for the abstract namespace), each state change is one datagram of
``KEY=VALUE`` lines: ``READY=1``, ``RELOADING=1`` with ``MONOTONIC_USEC=``,
``STOPPING=1``, ``STATUS=`` for people, and ``WATCHDOG=1`` every half of
``WATCHDOG_USEC`` when the unit has a watchdog, and ``MAINPID=`` when a
supervisor hands over to its successor (SIGUSR2, see _upgrade.py), which
then inherits these variables. Sending never raises: a
service manager that went away must not take the server down with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence

from ._exceptions import ConfigurationError

logger = logging.getLogger("threadserve")

#: systemd hands sockets over from this descriptor on (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
SYSTEMD_PREFIX = "systemd:"
ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def activated_sockets(environ: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """The sockets systemd handed to this process, as ``(fd, name)``; clears the variables.

    Empty when there are none, or when they were meant for another process
    (``LISTEN_PID`` is not ours).
    """
    env = os.environ if environ is None else environ
    pid, count, names = (env.pop(name, None) for name in ACTIVATION_VARIABLES)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        number = int(count)
    except ValueError:
        logger.warning("ignoring malformed LISTEN_PID=%r / LISTEN_FDS=%r", pid, count)
        return []
    labels = names.split(":") if names else []
    labels += ["unknown"] * (number - len(labels))
    return [(LISTEN_FDS_START + i, labels[i]) for i in range(number)]


def resolve_binds(
    binds: Sequence[str] | None, activated: Sequence[tuple[int, str]]
) -> list[str] | None:
    """Turn ``systemd:NAME`` into ``fd://N``; with no binds, every activated socket.

    Returns None when there is nothing to bind from here (no binds, no
    activation): the caller's default applies.
    """
    if not binds:
        return [f"fd://{fd}" for fd, _name in activated] or None
    resolved = []
    for bind in binds:
        if not bind.startswith(SYSTEMD_PREFIX):
            resolved.append(bind)
            continue
        name = bind[len(SYSTEMD_PREFIX) :]
        matches = [fd for fd, label in activated if label == name]
        if not matches:
            offered = ", ".join(sorted({label for _fd, label in activated})) or "none"
            raise ConfigurationError(
                f"bad bind address {bind!r}: systemd passed no socket named {name!r} "
                f"(names passed: {offered})"
            )
        resolved += [f"fd://{fd}" for fd in matches]
    return resolved


class Notifier:
    """Sends sd_notify datagrams; does nothing when NOTIFY_SOCKET is not set."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None)
        usec, watchdog_pid = env.pop("WATCHDOG_USEC", None), env.pop("WATCHDOG_PID", None)
        self._address: str | bytes | None = None
        # As given, for a successor supervisor to take over (see environment()).
        self._variables = {"NOTIFY_SOCKET": address or "", "WATCHDOG_USEC": usec or ""}
        if address:
            # "@name" is the abstract namespace: a leading NUL byte on the wire.
            self._address = b"\0" + address[1:].encode() if address.startswith("@") else address
        self.watchdog_interval: float | None = None
        if usec and (watchdog_pid is None or watchdog_pid == str(os.getpid())):
            with contextlib.suppress(ValueError):
                if int(usec) > 0:
                    self.watchdog_interval = int(usec) / 2e6  # Half the timeout, as systemd asks.
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._watchdog_stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def environment(self) -> dict[str, str]:
        """The variables that let a successor supervisor notify in this one's place.

        WATCHDOG_PID is left out: the successor is the one to ping once it
        is the main process.
        """
        return {name: value for name, value in self._variables.items() if value}

    def notify(self, **fields: object) -> None:
        """Send ``KEY=VALUE`` lines (keyword names are upper-cased) in one datagram."""
        if self._address is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._socket.set_inheritable(False)
                self._socket.sendto(message.encode(), self._address)
            except OSError as exc:
                logger.warning("cannot notify the service manager (%s): %s", message, exc)

    def ready(self, status: str) -> None:
        self.notify(ready=1, status=status)

    def reloading(self, status: str) -> None:
        # systemd 253+ wants the monotonic time with RELOADING=1, to match it to the reload.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(reloading=1, monotonic_usec=usec, status=status)

    def stopping(self, status: str) -> None:
        self.notify(stopping=1, status=status)

    def status(self, status: str) -> None:
        self.notify(status=status)

    def start_watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` every WATCHDOG_USEC/2 from a thread, until ``close()``."""
        if self._address is None or self.watchdog_interval is None or self._watchdog:
            return
        interval = self.watchdog_interval

        def ping() -> None:
            while not self._watchdog_stop.wait(interval):
                self.notify(watchdog=1)

        self.notify(watchdog=1)
        self._watchdog = threading.Thread(target=ping, name="threadserve watchdog", daemon=True)
        self._watchdog.start()

    def close(self) -> None:
        self._watchdog_stop.set()
        if self._watchdog is not None:
            self._watchdog.join(1.0)
            self._watchdog = None
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
