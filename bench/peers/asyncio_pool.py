"""Peer: asyncio Protocol with an executor sized to the connection count.

What a careful asyncio user writes for blocking work: the stock default
executor has min(32, cpu_count + 4) threads, far fewer than the connections
of the 1,000-connection blocking case, so this peer installs a
`ThreadPoolExecutor(max_workers=--pool)` as the loop's default executor, and
`asyncio.to_thread` runs every 10 ms call on it. The harness passes the case's
connection count as `--pool`. Echo is the asyncio Protocol peer's.
SIGTERM is not handled.
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor

from bench.peers._common import parse_args
from bench.peers.asyncio_protocol import BlockingEchoProtocol, EchoProtocol


async def serve(host: str, port: int, workload: str, pool: int) -> None:
    loop = asyncio.get_running_loop()
    # to_thread uses the loop's default executor, so replacing it is all the
    # blocking protocol needs to run on a pool of this size.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=pool))
    factory = EchoProtocol if workload == "echo" else BlockingEchoProtocol
    server = await loop.create_server(factory, host, port, reuse_address=True)
    async with server:
        await server.serve_forever()


def add_pool_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pool", type=int, default=1000, help="executor threads (the harness: the connections)"
    )


def main() -> None:
    args = parse_args(__doc__ or "", add_pool_option)
    if args.pool < 1:
        raise SystemExit("--pool must be at least 1")
    asyncio.run(serve(args.host, args.port, args.workload, args.pool))


if __name__ == "__main__":
    main()
