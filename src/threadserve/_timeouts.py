"""Timeouts as one value object.

``None`` means "no limit". The defaults bound what a hostile or vanished
client can hold (a thread, a socket) while leaving ordinary protocols alone:
a partial frame must complete within ``read`` seconds, and a peer that stops
reading our replies is cut off after ``write`` seconds without progress.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ._checks import TIMEOUT
from ._exceptions import ConfigurationError


@dataclass(frozen=True)
class Timeouts:
    """Per-connection time limits, in seconds (``None``: no limit).

    * ``idle``: longest wait for the next bytes when no frame is in progress.
    * ``read``: longest time one ``readline``/``readexactly`` frame may take
      once its first byte arrived, so a client trickling a byte a second
      (slowloris) cannot hold a thread.
    * ``write``: longest time a send may make no progress (the peer stopped reading).
    * ``handshake``: longest TLS handshake.
    * ``lifetime``: longest total life of a connection.
    """

    idle: float | None = None
    read: float | None = 30.0
    write: float | None = 60.0
    handshake: float | None = 10.0
    lifetime: float | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and not TIMEOUT.holds(value):
                raise ConfigurationError(
                    f"timeout {field.name}={value!r}: must be {TIMEOUT.describe()}, "
                    "or None for no limit"
                )
