"""The small family of exceptions threadserve raises.

Each one also inherits the builtin a caller would already catch, so
``except TimeoutError`` or ``except ValueError`` keeps working for code that
knows nothing about threadserve (urllib3 v2 does the same).
"""

from __future__ import annotations

import errno


class ThreadserveError(Exception):
    """Base class of every exception threadserve raises on purpose."""


class ConfigurationError(ThreadserveError, ValueError):
    """A setting or bind address cannot be used; the message says which and why."""


class BindError(ThreadserveError, OSError):
    """A listening address could not be opened (in use, not permitted, unknown host)."""


class ConnectionTimeout(ThreadserveError, TimeoutError):
    """A read or write on a connection went past its deadline."""


class ReadTimeout(ConnectionTimeout):
    """No data arrived within a read deadline.

    ``kind`` says which deadline: ``"read"``, a line or frame not complete
    within the read timeout; ``"idle"``, no bytes for the idle timeout;
    ``"lifetime"``, the connection's lifetime ran out while it waited.
    """

    #: Also the class's, for subclasses whose __init__ does not call this one.
    kind = "read"

    def __init__(self, message: str = "", kind: str = "read") -> None:
        super().__init__(message)
        self.kind = kind


class WriteTimeout(ConnectionTimeout):
    """The peer did not take our data within the write deadline (it stopped reading)."""


class HandshakeTimeout(ConnectionTimeout):
    """The client did not complete the TLS handshake in time."""


class ConnectionClosed(ThreadserveError, BrokenPipeError):
    """A write to a connection that takes no more writes.

    Raised by ``Connection.sendall`` (from any thread) once the connection is
    closed, once the server has begun its goodbye (the notice must stay the
    last thing written), or once a ``Group`` cut it off as too slow. It is a
    ``BrokenPipeError`` (``errno.EPIPE``), so code that already catches
    ``BrokenPipeError``, ``ConnectionError`` or ``OSError`` around a send
    catches it too.
    """

    def __init__(self, why: str) -> None:
        super().__init__(errno.EPIPE, f"connection closed: {why}")
        self.why = why


class IncompleteRead(ThreadserveError, EOFError):
    """The stream ended (peer EOF or server stop) before a whole frame arrived.

    ``partial`` holds the bytes that did arrive, so nothing that was read is lost.
    """

    def __init__(self, partial: bytes, expected: int | None) -> None:
        self.partial = partial
        self.expected = expected
        wanted = "a line end" if expected is None else f"{expected} bytes"
        super().__init__(f"stream ended after {len(partial)} bytes, before {wanted}")


class FrameTooLarge(ThreadserveError, ValueError):
    """A line or frame exceeded the limit the handler allowed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"frame exceeds the limit of {limit} bytes")


class ProxyProtocolError(ThreadserveError, ValueError):
    """A PROXY protocol header is malformed, incomplete in time, or from a proxy not allowed."""
