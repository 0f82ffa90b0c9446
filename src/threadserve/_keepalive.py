"""TCP keepalive options, spelled the way each platform spells them.

Keepalive frees the thread of a client that vanished (power loss, a cable, a
NAT that forgot it): after ``idle`` seconds of silence the kernel probes
every ``interval`` seconds and gives up after ``probes`` unanswered probes.

- Linux (and FreeBSD): ``TCP_KEEPIDLE``, ``TCP_KEEPINTVL``, ``TCP_KEEPCNT``.
- macOS: the idle time is ``TCP_KEEPALIVE``; Python has the other two there
  from 3.10 on.
- Anywhere an option is missing, it is left out: the system default applies
  (two hours of silence before the first probe, typically), which is still
  better than no keepalive at all.
"""

from __future__ import annotations

import socket
from typing import Any

#: (level, option, value), as ``setsockopt`` takes them.
SocketOption = tuple[int, int, int]


def keepalive_options(
    idle: int, interval: int, probes: int, platform: Any = socket
) -> list[SocketOption]:
    """The options that turn keepalive on with these timings, as far as ``platform`` has them.

    ``platform`` is the ``socket`` module; tests pass a stand-in that has
    another platform's constants.
    """
    options: list[SocketOption] = [(platform.SOL_SOCKET, platform.SO_KEEPALIVE, 1)]
    idle_option = getattr(platform, "TCP_KEEPIDLE", None)
    if idle_option is None:
        idle_option = getattr(platform, "TCP_KEEPALIVE", None)  # macOS
    for option, value in (
        (idle_option, idle),
        (getattr(platform, "TCP_KEEPINTVL", None), interval),
        (getattr(platform, "TCP_KEEPCNT", None), probes),
    ):
        if option is not None:
            options.append((platform.IPPROTO_TCP, option, value))
    return options
