"""Socket calls that do not release the GIL when they cannot block, if the helper is built.

``Connection``'s hot path reads and writes with these when they exist: a
``recv`` of bytes already queued, or a ``send`` into a free buffer, takes a
microsecond, and releasing the GIL around it (as CPython's socket methods
always do) hands the GIL to another connection thread and then waits to get
it back. See _speedups.c for the details and bench/nowait.py for the
measurement.

``recv_nowait(sock, size)`` returns the bytes queued (``b""`` at end of
stream) or None if none are; ``send_nowait(sock, data)`` returns how many
bytes the kernel took (0 if its buffer is full). Both raise ``OSError`` as
the socket methods do. Both are None when the compiled helper is missing
(no compiler at install time) or ``THREADSERVE_PURE_PYTHON=1`` is set; the
standard methods are then used, and behave the same apart from speed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

RecvNowait = Callable[[socket.socket, int], "bytes | None"]
SendNowait = Callable[[socket.socket, "bytes | bytearray | memoryview"], int]


def _load() -> tuple[RecvNowait | None, SendNowait | None]:
    if os.environ.get("THREADSERVE_PURE_PYTHON", "") in ("1", "true", "yes"):
        return None, None
    try:
        from . import _speedups
    except ImportError:  # Built without a compiler: the standard methods serve.
        return None, None
    return _speedups.recv_nowait, _speedups.send_nowait


recv_nowait, send_nowait = _load()

#: Whether the compiled helper is in use.
COMPILED = recv_nowait is not None
