"""What the peers share around their queries: the command line, and asyncio's serving loop.

The asyncio peers differ only in how one request line becomes one reply line
(asyncpg on the event loop, or psycopg in a worker thread); the loop around it
is here, so that the comparison measures that and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

#: One request line (with its newline) in, one reply line out.
Answer = Callable[[bytes], Awaitable[bytes]]


def arguments(description: str, name: str) -> argparse.ArgumentParser:
    """``--port``, ``--dsn`` and ``--name`` (PostgreSQL's application_name), as every peer takes.

    The caller adds how many database connections (or threads) it uses.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--name", default=name)
    return parser


async def serve_lines(port: int, answer: Answer) -> None:
    """Serve on 127.0.0.1:``port`` until killed, one ``answer`` per line, in order."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(await answer(line))
                await writer.drain()
        except ConnectionError:
            pass  # the load generator resets what is in flight when it ends
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()
