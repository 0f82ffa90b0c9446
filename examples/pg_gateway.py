"""A line protocol in front of PostgreSQL, served from plain blocking psycopg 3 calls.

Each client gets its own thread; each request borrows a database connection
from a ``psycopg_pool.ConnectionPool`` sized to the server's
``max_connections``, so no client ever waits for another one's connection.

Protocol: one request per line, one reply line per request.

    GET <id>          the row of table ``items`` with that id, as one JSON object
    SLOW <seconds>    runs pg_sleep (a stand-in for a slow query); "OK slept <seconds>"
    PING              "PONG"
    QUIT              "BYE", then the server closes the connection
    anything else     "ERR <reason>", and the connection carries on

Stopping (SIGTERM, Ctrl-C): a query in flight is cancelled with psycopg's own
cancel (``Connection.cancel_safe``), registered through ``conn.on_cancel``, so
the stop reaches into the blocking library: the client is told
``ERR cancelled: server stopping`` for that request, then gets the server's
goodbye notice, and the process exits without waiting for the query.

Run it::

    python examples/pg_gateway.py --bind 127.0.0.1:7000 \\
        --dsn "host=/var/run/postgresql dbname=shop" --demo-rows 1000

``--demo-rows`` creates and fills the ``items`` table when it is missing.
Exit status as ``threadserve serve``: 0 clean stop, 1 could not start, 3 forced.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence

import _run  # The options, logging and exit status the examples share.
import psycopg
import psycopg_pool

import threadserve

logger = logging.getLogger("pg_gateway")

APPLICATION_NAME = "pg_gateway"
#: A request line is a verb and a number: anything longer is a client bug.
MAX_LINE = 256
#: How long a cancel request to the database may take before it is given up.
CANCEL_TIMEOUT = 2.0
GET_SQL = "SELECT row_to_json(i)::text FROM items AS i WHERE i.id = %s"
SLOW_SQL = "SELECT pg_sleep(%s)"
#: Largest id the ``items.id`` column (a PostgreSQL integer) can hold.
MAX_ID = 2**31 - 1
DEMO_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id integer PRIMARY KEY,
    name text NOT NULL,
    price numeric(10, 2) NOT NULL,
    tags text[] NOT NULL DEFAULT '{}'
)
"""
DEMO_FILL = """
INSERT INTO items (id, name, price, tags)
SELECT n, 'item ' || n, (n %% 1000) / 10.0, ARRAY['demo', 'group ' || (n %% 7)]
FROM generate_series(1, %s) AS n
ON CONFLICT (id) DO NOTHING
"""


class Stopping(Exception):
    """The server is stopping: the request is answered with an error, not run."""


class RunningQuery:
    """The database connection a request is using, for the cancel hook to reach.

    The hook runs on the server's hook thread and may run late, after the
    query ended and its connection went back to the pool for another client
    to use: the lock and ``finish`` make sure it only ever cancels the query
    it was registered for.
    """

    def __init__(self, pg: psycopg.Connection[tuple[str]]) -> None:
        self._lock = threading.Lock()
        self._pg: psycopg.Connection[tuple[str]] | None = pg

    def cancel(self) -> None:
        with self._lock:
            if self._pg is None:
                return
            try:
                self._pg.cancel_safe(timeout=CANCEL_TIMEOUT)
            except (psycopg.Error, OSError) as exc:
                # The query then runs on; the server's grace period still bounds the stop.
                logger.warning("could not cancel a query: %s", exc)

    def finish(self) -> None:
        with self._lock:
            self._pg = None


class Gateway:
    """The handler: reads request lines, answers each from the database."""

    def __init__(self, pool: psycopg_pool.ConnectionPool, max_sleep: float) -> None:
        self.pool = pool
        self.max_sleep = max_sleep

    def __call__(self, conn: threadserve.Connection) -> None:
        # b"" at the client's EOF, and at stop once every line that had
        # already arrived has been read (and so gets its answer).
        while line := conn.readline(limit=MAX_LINE):
            reply = self.respond(conn, line)
            conn.sendall(reply)
            if reply == b"BYE\n":
                return

    def respond(self, conn: threadserve.Connection, line: bytes) -> bytes:
        """The reply line to one request line."""
        words = line.decode("ascii", errors="replace").split()
        if not words:
            return b"ERR empty request\n"
        verb, arguments = words[0].upper(), words[1:]
        try:
            if verb == "GET":
                return self.get(conn, arguments)
            if verb == "SLOW":
                return self.slow(conn, arguments)
        except Stopping:
            return b"ERR cancelled: server stopping\n"
        except psycopg.errors.QueryCanceled:
            if conn.cancelled:
                return b"ERR cancelled: server stopping\n"
            return b"ERR cancelled\n"  # statement_timeout, or pg_cancel_backend.
        except psycopg_pool.PoolTimeout:
            return b"ERR database busy\n"
        except psycopg.OperationalError as exc:
            logger.warning("%s: database unavailable: %s", conn.peer, exc)
            return b"ERR database unavailable\n"
        except psycopg.Error as exc:
            logger.warning("%s: database error: %s", conn.peer, exc)
            return f"ERR database error {exc.sqlstate or ''}".rstrip().encode() + b"\n"
        if verb == "PING" and not arguments:
            return b"PONG\n"
        if verb == "QUIT" and not arguments:
            return b"BYE\n"
        return b"ERR unknown request, expected GET <id>, SLOW <seconds>, PING or QUIT\n"

    def get(self, conn: threadserve.Connection, arguments: list[str]) -> bytes:
        if len(arguments) != 1 or not arguments[0].isdigit() or int(arguments[0]) > MAX_ID:
            return b"ERR bad id: expected GET <id>, id a whole number\n"
        row = self.query(conn, GET_SQL, (int(arguments[0]),))
        if row is None:
            return b"ERR not found\n"
        return row[0].encode() + b"\n"

    def slow(self, conn: threadserve.Connection, arguments: list[str]) -> bytes:
        try:
            seconds = float(arguments[0]) if len(arguments) == 1 else -1.0
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= self.max_sleep:
            return f"ERR bad duration: expected SLOW <seconds>, 0 to {self.max_sleep:g}\n".encode()
        self.query(conn, SLOW_SQL, (seconds,))
        return f"OK slept {arguments[0]}\n".encode()

    def query(
        self, conn: threadserve.Connection, sql: str, params: tuple[object, ...]
    ) -> tuple[str] | None:
        """Run one query on a pooled connection, cancelled if the server stops meanwhile."""
        if conn.cancelled:
            raise Stopping
        with self.pool.connection() as pg:
            running = RunningQuery(pg)
            unregister = conn.on_cancel(running.cancel)
            try:
                # A stop that lands between this check and the query reaching
                # the database finds nothing to cancel yet; the server's grace
                # period still bounds it. The window is a few microseconds.
                if conn.cancelled:
                    raise Stopping
                row: tuple[str] | None = pg.execute(sql, params).fetchone()
                return row
            finally:
                unregister()
                running.finish()


def database_limit(dsn: str) -> int:
    """How many connections the database lets ordinary users open (raises psycopg.Error)."""
    with psycopg.connect(dsn, autocommit=True, application_name=APPLICATION_NAME) as pg:
        row = pg.execute(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
        ).fetchone()
    assert row is not None
    return int(row[0])


def create_demo_table(dsn: str, rows: int) -> None:
    """Create the ``items`` table if it is missing and fill ids 1 to ``rows``."""
    with psycopg.connect(dsn, autocommit=True, application_name=APPLICATION_NAME) as pg:
        pg.execute(DEMO_SCHEMA)
        pg.execute(DEMO_FILL, (rows,))
        pg.execute("ANALYZE items")


def build_parser() -> argparse.ArgumentParser:
    parser = _run.arguments(
        "pg_gateway",
        "Answer 'GET <id>' lines with rows of a PostgreSQL table, as JSON.",
        bind="127.0.0.1:7000",
        max_connections=20,
        max_connections_help="clients served at once, and so the pool's largest size",
    )
    parser.add_argument("--dsn", required=True, help="libpq connection string or URI")
    parser.add_argument(
        "--pool-min",
        type=int,
        default=1,
        help="database connections opened at start and kept (default: 1)",
    )
    parser.add_argument(
        "--pool-timeout",
        type=float,
        default=10.0,
        help="seconds a request waits for a database connection (default: 10)",
    )
    parser.add_argument(
        "--max-sleep", type=float, default=60.0, help="longest SLOW accepted (default: 60 s)"
    )
    parser.add_argument("--demo-rows", type=int, default=0, help="create and fill table items")
    parser.add_argument(
        "--application-name",
        default=APPLICATION_NAME,
        help="how the pool's connections show in pg_stat_activity (default: pg_gateway)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _run.parse(build_parser(), argv)
    if not 1 <= args.pool_min <= args.max_connections:
        print("pg_gateway: error: need 1 <= --pool-min <= --max-connections", file=sys.stderr)
        return 1
    try:
        # Checked before binding: a wrong DSN or a pool the database cannot
        # hold is a start-up error with a message, not errors under load.
        limit = database_limit(args.dsn)
        if args.max_connections > limit:
            print(
                f"pg_gateway: error: --max-connections {args.max_connections} needs as many "
                f"database connections, and the database allows {limit}",
                file=sys.stderr,
            )
            return 1
        if args.demo_rows > 0:
            create_demo_table(args.dsn, args.demo_rows)
    except psycopg.Error as exc:
        print(f"pg_gateway: error: cannot use the database: {exc}", file=sys.stderr)
        return 1
    pool = psycopg_pool.ConnectionPool(
        args.dsn,
        min_size=args.pool_min,
        max_size=args.max_connections,
        timeout=args.pool_timeout,
        kwargs={"autocommit": True, "application_name": args.application_name},
        name=args.application_name,
        open=False,
    )
    with _run.start_up_errors("pg_gateway"):
        server = threadserve.Server(
            Gateway(pool, args.max_sleep),
            args.bind,
            max_connections=args.max_connections,
            grace=args.grace,
        )
    with server:
        try:
            pool.open(wait=True, timeout=30.0)
        except psycopg_pool.PoolTimeout as exc:
            print(f"pg_gateway: error: cannot fill the pool: {exc}", file=sys.stderr)
            server.stop()
            return 1
        logger.info("pool of %d to %d database connections", args.pool_min, args.max_connections)
        with pool:
            report = server.serve_forever()
    return _run.exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
