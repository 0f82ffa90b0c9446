"""asyncio streams, each query run with ``asyncio.to_thread`` on psycopg.

What asyncio's documentation suggests for a blocking library. ``--workers 0``
keeps the default executor (min(32, cores + 4) threads: 6 here); a number
sizes it, as someone tuning for the load would. The pool has one database
connection per worker thread. SIGTERM kills it (asyncio's default).

    python -m bench.pg.peer_to_thread --port P --dsn DSN --workers N
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from .common import arguments, serve_lines
from .psycopg_peer import answer, open_pool


async def serve(port: int, dsn: str, workers: int, name: str) -> None:
    loop = asyncio.get_running_loop()
    if workers > 0:
        loop.set_default_executor(ThreadPoolExecutor(max_workers=workers))
    else:
        workers = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default.
    pool = open_pool(dsn, workers, name)
    ask = partial(answer, pool)

    async def answer_in_thread(line: bytes) -> bytes:
        return await asyncio.to_thread(ask, line)

    await serve_lines(port, answer_in_thread)


def main() -> None:
    parser = arguments(__doc__, "bench to_thread")
    parser.add_argument("--workers", type=int, default=0, help="0: the default executor")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.dsn, args.workers, args.name))


if __name__ == "__main__":
    main()
