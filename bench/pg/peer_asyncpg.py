"""asyncio streams with asyncpg, the async-native PostgreSQL driver: no threads at all.

The pool has ``--pool`` connections, all opened before serving. SIGTERM kills
it (asyncio's default).

    python -m bench.pg.peer_asyncpg --port P --dsn DSN --pool N
"""

from __future__ import annotations

import asyncio

import asyncpg
from psycopg.conninfo import conninfo_to_dict

from .common import arguments, serve_lines
from .protocol import BAD_REQUEST, GET_SQL_NUMBERED, SLOW_SQL_NUMBERED, parse, reply


async def serve(port: int, dsn: str, size: int, name: str) -> None:
    # asyncpg takes no libpq key=value strings: pass the parts.
    info = {key: str(value) for key, value in conninfo_to_dict(dsn).items()}
    pool = await asyncpg.create_pool(
        host=info["host"],
        port=int(info.get("port", "5432")),
        user=info.get("user"),
        database=info.get("dbname"),
        min_size=size,
        max_size=size,
        server_settings={"application_name": name},
    )

    async def answer(line: bytes) -> bytes:
        request = parse(line)
        if request is None:
            return BAD_REQUEST
        async with pool.acquire() as pg:
            if request.slow:
                await pg.execute(SLOW_SQL_NUMBERED, request.value)
                return reply(request, None)
            return reply(request, await pg.fetchval(GET_SQL_NUMBERED, int(request.value)))

    await serve_lines(port, answer)


def main() -> None:
    parser = arguments(__doc__, "bench asyncpg")
    parser.add_argument("--pool", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.dsn, args.pool, args.name))


if __name__ == "__main__":
    main()
