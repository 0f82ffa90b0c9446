"""Peer: asyncio with a `Protocol` (callbacks, no streams).

The fastest way to serve TCP on the stock event loop. For the blocking
workload each chunk is handed to `asyncio.to_thread`, i.e. the loop's default
executor, whose size is min(32, cpu_count + 4): that pool, not the number of
connections, bounds the throughput. Replies on one connection are chained so
they leave in the order the chunks arrived. SIGTERM is not handled.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from bench.peers._common import BLOCKING_SECONDS, parse_args

# uvloop's transports implement asyncio.Transport without subclassing it, so
# the transport is narrowed with a cast, not an isinstance check.


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class BlockingEchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.previous: asyncio.Task[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.previous = asyncio.ensure_future(self.reply(data, self.previous))

    async def reply(self, data: bytes, previous: asyncio.Task[None] | None) -> None:
        await asyncio.to_thread(time.sleep, BLOCKING_SECONDS)
        if previous is not None:
            await previous
        if not self.transport.is_closing():
            self.transport.write(data)


async def serve(host: str, port: int, workload: str) -> None:
    loop = asyncio.get_running_loop()
    factory = EchoProtocol if workload == "echo" else BlockingEchoProtocol
    server = await loop.create_server(factory, host, port, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    args = parse_args(__doc__ or "")
    asyncio.run(serve(args.host, args.port, args.workload))


if __name__ == "__main__":
    main()
