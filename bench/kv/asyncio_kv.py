"""The asyncio twin of examples/kv.py: the same commands on the same SQLite schema.

    python -m bench.kv.asyncio_kv --bind 127.0.0.1:6381 --db twin.sqlite3 [--sqlite-in loop]

It imports the example's own request parser, commands and storage (``resp``,
``kv.Session``, ``kv.Database``), so the only difference measured is how the
server runs them: one event loop instead of one thread per client.

Where the SQLite calls run (``--sqlite-in``):

* ``thread`` (the default): ``asyncio.to_thread``, the documented way to call
  blocking code from asyncio, and what a user would write, since ``sqlite3``
  blocks on the disk and, while another writer holds the database, for up to
  its busy timeout; in the loop that would freeze every client. Each executor
  thread keeps its own ``sqlite3`` connection (``sqlite3`` objects must stay
  on one thread). The default executor has min(32, cores + 4) threads: 6 here.
  One ``to_thread`` call per batch of pipelined commands, not per command.
* ``loop``: call SQLite directly in the event loop, one connection. Fastest
  while every call is short (``synchronous=NORMAL`` commits do not fsync),
  and it shows what ``to_thread`` costs; one slow query stalls every client.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from kv import Database, Session, Store, answer
from resp import RequestParser

logger = logging.getLogger("asyncio_kv")


class ThreadStores:
    """One ``sqlite3`` connection per executor thread, opened on first use."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._local = threading.local()

    def here(self) -> Store:
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = self._database.connect()
        return store


def answer_in_thread(
    stores: ThreadStores, session: Session, parser: RequestParser, data: bytes
) -> tuple[bytes, bool]:
    session.store = stores.here()  # This executor thread's own connection.
    return answer(session, parser, data)


async def handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stores: ThreadStores,
    loop_store: Store | None,
    client_id: int,
) -> None:
    session = Session(loop_store or stores.here(), client_id=client_id)
    parser = RequestParser()
    try:
        while data := await reader.read(65536):
            if loop_store is not None:
                replies, close = answer(session, parser, data)
            else:
                replies, close = await asyncio.to_thread(
                    answer_in_thread, stores, session, parser, data
                )
            if replies:
                writer.write(replies)
                await writer.drain()
            if close:
                break
    except ConnectionError:
        pass  # A client that resets is not the server's problem.
    finally:
        writer.close()


async def serve(host: str, port: int, database: Database, in_loop: bool) -> None:
    stores = ThreadStores(database)
    # In loop mode this thread (the loop's) holds the only connection.
    loop_store = stores.here() if in_loop else None
    client_ids = iter(range(1, sys.maxsize))

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle(reader, writer, stores, loop_store, next(client_ids))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(on_client, host, port, reuse_address=True)
    logger.warning("serving on %s:%d", host, port)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:6381", metavar="HOST:PORT")
    parser.add_argument("--db", default="twin.sqlite3", metavar="FILE")
    parser.add_argument("--sqlite-in", choices=["thread", "loop"], default="thread")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    host, _, port = args.bind.rpartition(":")
    asyncio.run(serve(host, int(port), Database(args.db), args.sqlite_in == "loop"))


if __name__ == "__main__":
    main()
