"""RESP, the Redis serialization protocol: a request parser and reply encoders, with no I/O.

Theory of operation
===================

A client sends commands in one of two forms:

* an *array of bulk strings*, which every client library uses::

      *3\\r\\n$3\\r\\nSET\\r\\n$1\\r\\nk\\r\\n$1\\r\\nv\\r\\n

* an *inline command*: one line of words, which is what a person typing into
  ``telnet`` or ``redis-cli``'s raw mode sends, and what ``redis-benchmark``
  sends for its inline tests::

      SET k "hello world"\\r\\n

Clients may *pipeline*: send many commands before reading any reply. So the
parser is fed whatever bytes arrived (``feed``) and hands back every complete
command it now holds (``commands``), keeping a partial one for the next feed.
The server answers each in order. It knows nothing about sockets, threads or
event loops, which is why one parser serves both the threaded example and its
asyncio twin in ``bench/kv``.

A malformed request cannot be skipped: nothing says where the next command
starts. So every error here is fatal to the connection (as in Redis itself):
the server sends the replies it owes, then ``-ERR Protocol error: ...``, then
closes. Limits bound what one client can make the server hold in memory; a
request over them is a protocol error too, raised as soon as its header
announces the size, before the bytes are read.

Replies are encoded by the functions at the bottom. RESP3 (which a client asks
for with ``HELLO 3``) differs from RESP2 only in a few types; the ones this
server needs are the null and the map, so ``Encoder`` carries the version.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

CRLF = b"\r\n"


class ProtocolError(Exception):
    """The client broke the protocol; reply ``-ERR Protocol error: <message>`` and close."""


@dataclass(frozen=True)
class Limits:
    """How much one request may hold. The defaults follow Redis's where Redis has one."""

    #: Longest inline command (Redis: 64 KiB).
    max_inline: int = 64 * 1024
    #: Most arguments in one command (Redis: 1,048,576).
    max_args: int = 1024 * 1024
    #: Largest argument. Redis allows 512 MiB; a value in a SQLite row is better kept small.
    max_bulk: int = 8 * 1024 * 1024
    #: Largest command, all arguments together.
    max_command: int = 64 * 1024 * 1024


# A header line ("*3", "$11") is short; anything longer is garbage, not a slow client.
_MAX_HEADER_LINE = 32


class RequestParser:
    """Turns received bytes into commands (lists of byte strings).

    Usage::

        parser.feed(data)
        for command in parser.commands():  # may raise ProtocolError
            reply = execute(command)
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._buffer = bytearray()
        self._pos = 0  # Where the unparsed bytes start in _buffer.
        # The array command being assembled, across feeds.
        self._args: list[bytes] | None = None
        self._args_left = 0
        self._bulk_size = -1  # Size of the bulk string whose header was read; -1: none.
        self._command_bytes = 0

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        if self._pos:
            # Drop what was parsed; CPython makes deleting a bytearray's head cheap.
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    @property
    def idle(self) -> bool:
        """True when no partial command is held: the client is between commands."""
        return self._args is None and self._pos == len(self._buffer)

    def commands(self) -> Iterator[list[bytes]]:
        """Yield every complete command received so far, in order."""
        while (command := self._next_command()) is not None:
            yield command

    # ------------------------------------------------------------------ internals

    def _next_command(self) -> list[bytes] | None:
        while self._args is None:
            if self._pos == len(self._buffer):
                return None
            if self._buffer[self._pos] == ord("*"):
                line = self._line(_MAX_HEADER_LINE, "too big mbulk count string")
                if line is None:
                    return None
                count = _parse_size(line, "multibulk length")
                if count > self.limits.max_args:
                    raise ProtocolError(
                        f"{count} arguments, over the limit of {self.limits.max_args}"
                    )
                if count > 0:  # Redis ignores "*0" and "*-1" requests; so do we.
                    self._args, self._args_left, self._command_bytes = [], count, 0
            else:
                line = self._line(self.limits.max_inline, "too big inline request")
                if line is None:
                    return None
                words = split_inline(line)
                if words:  # An empty line is ignored (redis-cli --pipe sends some).
                    return words
        while self._args_left:
            if self._bulk_size < 0:
                line = self._line(_MAX_HEADER_LINE, "too big bulk count string")
                if line is None:
                    return None
                if line[:1] != b"$":
                    raise ProtocolError(f"expected '$', got {line[:1].decode('latin-1')!r}")
                size = _parse_size(line, "bulk length")
                if size > self.limits.max_bulk:
                    raise ProtocolError(
                        f"bulk length {size}, over the limit of {self.limits.max_bulk}"
                    )
                self._command_bytes += size
                if self._command_bytes > self.limits.max_command:
                    raise ProtocolError(f"command over the limit of {self.limits.max_command}")
                self._bulk_size = size
            end = self._pos + self._bulk_size
            if len(self._buffer) < end + 2:
                return None  # The rest of this argument has not arrived yet.
            if self._buffer[end : end + 2] != CRLF:
                raise ProtocolError("bulk string not terminated by CRLF")
            self._args.append(bytes(self._buffer[self._pos : end]))
            self._pos = end + 2
            self._bulk_size = -1
            self._args_left -= 1
        command, self._args = self._args, None
        return command

    def _line(self, limit: int, too_long: str) -> bytes | None:
        """The next line without its line ending, or None if it is not complete yet."""
        end = self._buffer.find(b"\n", self._pos, self._pos + limit + 2)
        if end < 0:
            if len(self._buffer) - self._pos > limit:
                raise ProtocolError(too_long)
            return None
        line = bytes(self._buffer[self._pos : end])
        self._pos = end + 1
        # Redis accepts a bare "\n" in inline commands; taking it everywhere costs nothing.
        return line[:-1] if line.endswith(b"\r") else line


def _parse_size(line: bytes, what: str) -> int:
    try:
        return int(line[1:])
    except ValueError:
        raise ProtocolError(f"invalid {what}") from None


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command into words, as redis-cli and Redis do.

    Words are separated by spaces. ``"..."`` quotes a word and understands
    ``\\n``, ``\\r``, ``\\t``, ``\\"``, ``\\\\`` and ``\\xHH``; ``'...'`` quotes
    one literally (``\\'`` aside). A closing quote must be followed by a space
    or the end of the line.
    """
    words: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \t\r\n":
            i += 1
        if i == n:
            return words
        word = bytearray()
        quote = line[i] if line[i] in b"\"'" else None
        if quote is not None:
            i += 1
        while True:
            if i == n:
                if quote is not None:
                    raise ProtocolError("unbalanced quotes in request")
                break
            char = line[i]
            if quote is None:
                if char in b" \t\r\n":
                    break
                word.append(char)
            elif char == quote:
                i += 1
                if i < n and line[i] not in b" \t\r\n":
                    raise ProtocolError("unbalanced quotes in request")
                break
            elif char == ord("\\") and i + 1 < n:
                following = line[i + 1]
                if quote == ord('"'):
                    digits = line[i + 2 : i + 4]
                    if following == ord("x") and len(digits) == 2 and set(digits) <= _HEX:
                        word.append(int(digits, 16))
                        i += 4
                    else:
                        word += _ESCAPES.get(following, bytes([following]))
                        i += 2
                    continue
                if following == ord("'"):  # In single quotes only \\' is an escape.
                    word.append(following)
                    i += 2
                    continue
                word.append(char)
            else:
                word.append(char)
            i += 1
        words.append(bytes(word))


# ---------------------------------------------------------------------- replies

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"


def simple(text: str) -> bytes:
    """A simple string: ``+text``. It must not contain a line break."""
    return b"+" + text.encode() + CRLF


def error(message: str) -> bytes:
    """An error reply. By convention the message starts with a code: ``ERR``, ``WRONGTYPE``..."""
    # A line break would end the reply early and desynchronise the client.
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode() + CRLF


def integer(value: int) -> bytes:
    return b":%d\r\n" % value


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


@dataclass
class Encoder:
    """The replies whose encoding depends on the protocol version (2 or 3)."""

    protocol: int = 2

    @property
    def null(self) -> bytes:
        return b"_\r\n" if self.protocol == 3 else b"$-1\r\n"

    def bulk_or_null(self, value: bytes | None) -> bytes:
        return self.null if value is None else bulk(value)

    def array(self, items: Sequence[bytes]) -> bytes:
        """An array of replies that are already encoded."""
        return b"*%d\r\n%s" % (len(items), b"".join(items))

    def map(self, pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
        """A map of encoded keys to encoded values; RESP2 has none and flattens it."""
        body = b"".join(key + value for key, value in pairs)
        if self.protocol == 3:
            return b"%%%d\r\n%s" % (len(pairs), body)
        return b"*%d\r\n%s" % (2 * len(pairs), body)
