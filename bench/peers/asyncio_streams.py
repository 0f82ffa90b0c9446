"""Peer: asyncio with streams (`start_server`, `StreamReader`/`StreamWriter`).

The style most asyncio tutorials teach: one coroutine per connection, reading
and writing as if it were blocking code. For the blocking workload it awaits
`asyncio.to_thread(time.sleep, ...)` (default executor, see the protocol peer).
"""

from __future__ import annotations

import asyncio
import time

from bench.peers._common import BLOCKING_SECONDS, parse_args


async def handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, blocking: bool
) -> None:
    try:
        while data := await reader.read(65536):
            if blocking:
                await asyncio.to_thread(time.sleep, BLOCKING_SECONDS)
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass  # a client that resets is not the server's problem
    finally:
        writer.close()


async def serve(host: str, port: int, workload: str) -> None:
    blocking = workload == "blocking"

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle(reader, writer, blocking)

    server = await asyncio.start_server(on_client, host, port, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    args = parse_args(__doc__ or "")
    asyncio.run(serve(args.host, args.port, args.workload))


if __name__ == "__main__":
    main()
