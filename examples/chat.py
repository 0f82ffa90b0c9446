"""A chat server: every line a client sends goes to every connected client.

The classic second example after echo, and the one where connections talk
to each other. Each client gets its own thread, which reads its lines and
hands each one to a ``threadserve.Group`` holding every client; the group
writes to all members without ever waiting for one of them.

Protocol (lines of at most 1 KiB)::

    * welcome, you are 127.0.0.1:50312     to a client once it is in the room
    * 127.0.0.1:50313 joined               to the others when a client arrives
    127.0.0.1:50313: hello                 a line someone sent (its sender gets it too)
    * 127.0.0.1:50313 left                 when a client goes (not at stop)

A client that does not read falls behind; once more than ``--max-queued``
bytes wait for it (1 MiB by default), it is cut off with
``* too slow: disconnected`` (if its socket still takes that) and the others
never wait for it. At stop (Ctrl-C, SIGTERM), every client gets every line
that reached the server before the stop, then ``Shutting down!``, then the
end of the stream.

Run it::

    python examples/chat.py --bind 127.0.0.1:7002

and talk with ``nc 127.0.0.1 7002`` from a few terminals.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import _run  # The options, logging and exit status the examples share.

import threadserve

MAX_LINE = 1024
MAX_QUEUED = 1024 * 1024
CUT_OFF = b"* too slow: disconnected\n"


class Chat:
    """The handler: one room, shared by every connection of the server."""

    def __init__(self, max_queued: int = MAX_QUEUED) -> None:
        self.room = threadserve.Group(max_queued=max_queued, cutoff_notice=CUT_OFF)

    def __call__(self, conn: threadserve.Connection) -> None:
        name = conn.peer.encode()
        self.room.join(conn)
        # After joining, so a client that has its welcome misses no line after it.
        conn.sendall(b"* welcome, you are " + name + b"\n")
        self.room.broadcast(b"* " + name + b" joined\n", exclude=conn)
        try:
            while line := conn.readline(MAX_LINE):
                if not line.endswith(b"\n"):
                    line += b"\n"  # The last line before the client's EOF.
                self.room.broadcast(name + b": " + line)
        finally:
            # No room.leave(conn): the connection leaves by itself as it
            # closes, and at stop only after the lines the others read
            # before the stop have reached it.
            if not conn.cancelled:  # At stop, the goodbye says it for everyone.
                self.room.broadcast(b"* " + name + b" left\n", exclude=conn)


def build_parser() -> argparse.ArgumentParser:
    parser = _run.arguments(
        "chat",
        "A chat server: every line a client sends goes to every connected client.",
        bind="127.0.0.1:7002",
        max_connections=None,
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        default=MAX_QUEUED,
        metavar="BYTES",
        help="cut off a client once this many bytes wait for it (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _run.parse(build_parser(), argv)
    with _run.start_up_errors("chat"):
        report = threadserve.serve(
            Chat(args.max_queued),
            args.bind,
            max_connections=args.max_connections,
            grace=args.grace,
        )
    return _run.exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
