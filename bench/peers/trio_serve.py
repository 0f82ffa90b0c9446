"""Peer: trio's `serve_tcp`, one task per connection.

For the blocking workload each chunk goes through `trio.to_thread.run_sync`,
whose default limiter allows 40 threads at a time. SIGTERM is not handled.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Awaitable, Callable

import trio

from bench.peers._common import BLOCKING_SECONDS, parse_args


async def echo(stream: trio.SocketStream) -> None:
    async for data in stream:
        await stream.send_all(data)


async def blocking_echo(stream: trio.SocketStream) -> None:
    async for data in stream:
        await trio.to_thread.run_sync(time.sleep, BLOCKING_SECONDS)
        await stream.send_all(data)


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def guarded(handler: Handler, stream: trio.SocketStream) -> None:
    # serve_tcp lets a handler's exception crash the whole server (its
    # documentation says to catch them in the handler), and a client that
    # resets raises BrokenResourceError: that is a normal end here.
    with contextlib.suppress(trio.BrokenResourceError):
        await handler(stream)


def main() -> None:
    args = parse_args(__doc__ or "")
    handler: Handler = echo if args.workload == "echo" else blocking_echo
    serve = functools.partial(trio.serve_tcp, functools.partial(guarded, handler), args.port)
    trio.run(functools.partial(serve, host=args.host))


if __name__ == "__main__":
    main()
