"""The one-line notices a client gets when the server cuts it off.

Line protocols can show a person or a log why the connection ended. Binary
protocols cannot take stray text: set a notice to ``None`` (or use
``Notices.none()``) and the client gets a clean end of stream instead.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Notices:
    """What a client is told, per reason, just before the server closes on it."""

    busy: bytes | None = b"Server busy, try again later\n"
    timed_out: bytes | None = b"Timed out\n"
    too_large: bytes | None = b"Line too long\n"

    @classmethod
    def none(cls) -> Notices:
        """No notices at all, for protocols where stray text would be a protocol error."""
        return cls(**{field.name: None for field in fields(cls)})
