"""The optional compiled read (``_fastread.c``), or None where it is not used.

``Connection.recv`` waits for input and reads it on every message. Compiled,
that is one release of the GIL for the ``poll`` and the ``recv`` together,
instead of one each, and no event list to build (``python -m
bench.cost_per_request`` shows what it saves). The package builds the module
when it is installed; where that failed (no C compiler), or where
``THREADSERVE_PURE_PYTHON`` is set to anything but ``""`` or ``0``, reads
take the same path in Python, with the same results. The test suite runs the
reading tests both ways.
"""

from __future__ import annotations

import os
from collections.abc import Callable

PollRecv = Callable[[int, int, int, int], bytes | int | None]

#: Set (not "" or "0") to read in Python even where the compiled read was built.
PURE_PYTHON_VARIABLE = "THREADSERVE_PURE_PYTHON"


def _load() -> PollRecv | None:
    if os.environ.get(PURE_PYTHON_VARIABLE, "") not in ("", "0"):
        return None
    try:
        from ._fastread import poll_recv
    except ImportError:
        return None
    return poll_recv


#: ``poll_recv(fd, stop_fd, bufsize, timeout_ms)``; see ``_fastread.c`` for what it returns.
poll_recv: PollRecv | None = _load()


def reads() -> str:
    """How this process reads from sockets, as ``threadserve --version`` says."""
    return "compiled" if poll_recv is not None else "pure Python"
