"""A Redis-protocol key-value server on threadserve, stored in SQLite.

    python examples/kv.py --bind 127.0.0.1:6380 --db kv.sqlite3
    redis-cli -p 6380 set greeting hello

Every client gets a thread of its own, and that thread opens its own
``sqlite3`` connection: plain blocking code, no event loop, no thread pool.
Redis's own tools (``redis-cli``, ``redis-benchmark``) and client libraries
(``redis-py``) work against it unchanged, RESP2 or RESP3, plain or pipelined.

Commands: PING ECHO GET SET (EX PX NX XX) DEL EXISTS INCR INCRBY DECR DECRBY MGET MSET
EXPIRE TTL DBSIZE FLUSHDB QUIT, and what clients send on connecting: HELLO,
SELECT 0, CLIENT SETNAME/GETNAME/SETINFO/ID, CONFIG GET, COMMAND, INFO.

Durability: a write is committed to SQLite before its reply is sent, so every
write a client saw acknowledged survives the server process ending, however
it ends (SIGTERM, a crash, SIGKILL). The database runs in WAL mode with
``synchronous=NORMAL``: a commit is an append to the WAL file, not an
``fsync``, so a power loss may lose the last moments of writes (Redis's
``appendfsync everysec`` makes the same trade). ``--synchronous full``
fsyncs every commit instead.

Stopping (Ctrl-C or SIGTERM): threadserve answers every command a client had
already sent, then sends ``-ERR server shutting down`` (a RESP error reply, so
a client library raises it as an error instead of choking on stray text), then
closes cleanly. The exit status is 0 for a clean stop.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import _run  # The options, logging and exit status the examples share.
import resp
from resp import OK, Encoder, Limits, ProtocolError, RequestParser

import threadserve

GOODBYE = b"-ERR server shutting down\r\n"
# What a client is told when the server turns it away; RESP errors too, as in Redis.
NOTICES = threadserve.Notices(
    busy=b"-ERR max number of clients reached\r\n",
    timed_out=None,  # Redis closes idle clients silently.
    too_large=None,  # Not used: the RESP parser enforces its own limits.
)

#: The Redis version reported to clients. Clients check it before using newer
#: commands; none of those is implemented, but 7.0 makes them not refuse to talk.
REDIS_VERSION = "7.0.0"

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    expires_at INTEGER  -- Unix time in milliseconds; NULL: never expires.
) WITHOUT ROWID
"""

# An expired key is hidden from every read: a row counts only if it is live.
LIVE = "(expires_at IS NULL OR expires_at > ?)"  # The parameter: now_ms().

# SQLite limits the parameters of one statement (32,766 since 3.32, 999 before).
_KEYS_PER_QUERY = 500

T = TypeVar("T")

_INT64 = re.compile(rb"-?(0|[1-9][0-9]{0,18})\Z")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class CommandError(Exception):
    """A command failed; the client gets ``-<message>`` and the connection carries on."""


def now_ms() -> int:
    # Wall-clock time, not monotonic: expiry times are stored and must mean the
    # same thing after a restart.
    return time.time_ns() // 1_000_000


def parse_int(value: bytes) -> int:
    """Parse a Redis integer argument (a decimal 64-bit signed integer, nothing else)."""
    if _INT64.match(value):
        number = int(value)
        if _INT64_MIN <= number <= _INT64_MAX:
            return number
    raise CommandError("ERR value is not an integer or out of range")


# ---------------------------------------------------------------------- storage


class Database:
    """The SQLite file and what the connections to it share.

    Each thread opens its own connection with ``connect()``: a ``sqlite3``
    connection must not be used by two threads at once, and one per thread
    needs no lock for reads (WAL lets readers run beside the writer).
    """

    def __init__(self, path: str, synchronous: str = "normal") -> None:
        self.path = path
        self.synchronous = synchronous
        # SQLite lets one writer in at a time. Its own wait for the write lock
        # (the busy handler) sleeps 1 ms, 2 ms, 5 ms... between tries, so many
        # threads writing at once would mostly be asleep. Queueing the writers
        # of this process on a lock hands the write lock over the moment it is free.
        self.write_lock = threading.Lock()
        with self.connect() as store:
            store.db.execute("PRAGMA journal_mode=WAL")  # Stored in the file: set once.
            store.db.execute(SCHEMA)
            # Expired rows are invisible but still stored; drop them once at start.
            store.db.execute("DELETE FROM kv WHERE expires_at <= ?", (now_ms(),))

    def connect(self) -> Store:
        return Store(self)


class Store:
    """One thread's connection to the database, and the queries the commands need."""

    def __init__(self, database: Database) -> None:
        # isolation_level=None: no implicit transactions. A single statement
        # commits by itself; several that must be atomic get BEGIN IMMEDIATE.
        self.db = sqlite3.connect(database.path, isolation_level=None, timeout=10.0)
        self.db.execute(f"PRAGMA synchronous={database.synchronous}")
        self._write_lock = database.write_lock

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Reads ------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        row = self.db.execute(
            f"SELECT value FROM kv WHERE key = ? AND {LIVE}", (key, now_ms())
        ).fetchone()
        return None if row is None else bytes(row[0])

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        """The live keys among ``keys``, with their values."""
        found: dict[bytes, bytes] = {}
        now = now_ms()
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            chunk = keys[start : start + _KEYS_PER_QUERY]
            marks = ", ".join("?" * len(chunk))
            query = f"SELECT key, value FROM kv WHERE key IN ({marks}) AND {LIVE}"
            for key, value in self.db.execute(query, (*chunk, now)):
                found[bytes(key)] = bytes(value)
        return found

    def ttl_ms(self, key: bytes) -> int | None:
        """Milliseconds left; -1 for a key that never expires; None for no key."""
        now = now_ms()
        row = self.db.execute(
            f"SELECT expires_at FROM kv WHERE key = ? AND {LIVE}", (key, now)
        ).fetchone()
        if row is None:
            return None
        return -1 if row[0] is None else row[0] - now

    def count(self) -> int:
        row = self.db.execute(f"SELECT count(*) FROM kv WHERE {LIVE}", (now_ms(),)).fetchone()
        return int(row[0])

    # Writes -----------------------------------------------------------------
    # Each one is committed when it returns: that is the durability promise.

    def write(self, action: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``action`` in one write transaction, committed before returning."""
        with self._write_lock:
            # IMMEDIATE takes the write lock at BEGIN: a transaction that reads
            # and then writes could otherwise fail to upgrade its lock.
            self.db.execute("BEGIN IMMEDIATE")
            try:
                result = action(self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return result

    def set(self, key: bytes, value: bytes, expires_at: int | None) -> None:
        with self._write_lock:  # One statement: it commits by itself.
            self.db.execute(
                "INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                (key, value, expires_at),
            )

    def delete(self, keys: Sequence[bytes]) -> int:
        """Delete keys; return how many of them were live."""

        def delete_all(db: sqlite3.Connection) -> int:
            deleted, now = 0, now_ms()
            for start in range(0, len(keys), _KEYS_PER_QUERY):
                chunk = set(keys[start : start + _KEYS_PER_QUERY])
                marks = ", ".join("?" * len(chunk))
                deleted += db.execute(
                    f"DELETE FROM kv WHERE key IN ({marks}) AND {LIVE}",
                    (*chunk, now),
                ).rowcount
            return deleted

        return self.write(delete_all)

    def flush(self) -> None:
        with self._write_lock:
            self.db.execute("DELETE FROM kv")


# ---------------------------------------------------------------------- commands


@dataclass
class Session:
    """One client's state, and the commands. ``execute`` turns a command into its reply."""

    store: Store
    encoder: Encoder = field(default_factory=Encoder)
    client_id: int = 0
    name: bytes | None = None
    #: Set by QUIT: send the replies so far, then close.
    closing: bool = False

    def execute(self, command: list[bytes]) -> bytes:
        name = command[0].upper()
        entry = COMMANDS.get(name)
        if entry is None:
            args = " ".join(f"'{arg.decode('utf-8', 'replace')[:40]}'" for arg in command[1:4])
            return resp.error(
                f"ERR unknown command '{command[0].decode('utf-8', 'replace')[:40]}', "
                f"with args beginning with: {args}"
            )
        method, arity = entry
        if (arity > 0 and len(command) != arity) or len(command) < -arity:
            return resp.error(
                f"ERR wrong number of arguments for '{name.decode().lower()}' command"
            )
        try:
            return method(self, command[1:])
        except CommandError as exc:
            return resp.error(str(exc))

    # Connection ---------------------------------------------------------------

    def ping(self, args: list[bytes]) -> bytes:
        return resp.bulk(args[0]) if args else resp.PONG

    def echo(self, args: list[bytes]) -> bytes:
        return resp.bulk(args[0])

    def quit(self, args: list[bytes]) -> bytes:
        self.closing = True
        return OK

    def select(self, args: list[bytes]) -> bytes:
        if parse_int(args[0]) != 0:
            raise CommandError("ERR DB index is out of range")  # One database, as Redis Cluster.
        return OK

    def hello(self, args: list[bytes]) -> bytes:
        """HELLO [protover [AUTH user pass] [SETNAME name]]: pick RESP2 or RESP3, say who we are.

        redis-py 8 opens every connection with ``HELLO 3``, and gives up if it fails.
        """
        if args:
            try:
                version = parse_int(args[0])
            except CommandError:
                raise CommandError(
                    "ERR Protocol version is not an integer or out of range"
                ) from None
            if version not in (2, 3):
                raise CommandError("NOPROTO unsupported protocol version")
            options = args[1:]
            while options:
                option = options[0].upper()
                if option == b"SETNAME" and len(options) >= 2:
                    self.name, options = options[1], options[2:]
                elif option == b"AUTH":
                    raise CommandError("ERR AUTH: this server has no users or passwords")
                else:
                    raise CommandError(
                        f"ERR Syntax error in HELLO option '{option.decode('utf-8', 'replace')}'"
                    )
            self.encoder.protocol = version
        info = [
            (b"server", resp.bulk(b"redis")),
            (b"version", resp.bulk(REDIS_VERSION.encode())),
            (b"proto", resp.integer(self.encoder.protocol)),
            (b"id", resp.integer(self.client_id)),
            (b"mode", resp.bulk(b"standalone")),
            (b"role", resp.bulk(b"master")),
            (b"modules", self.encoder.array([])),
        ]
        return self.encoder.map([(resp.bulk(key), value) for key, value in info])

    def client(self, args: list[bytes]) -> bytes:
        sub = args[0].upper()
        if sub == b"SETNAME" and len(args) == 2:
            if any(byte <= 32 or byte >= 127 for byte in args[1]):
                raise CommandError(
                    "ERR Client names cannot contain spaces, newlines or special characters."
                )
            self.name = args[1] or None
            return OK
        if sub == b"GETNAME" and len(args) == 1:
            return self.encoder.bulk_or_null(self.name)
        if sub == b"ID" and len(args) == 1:
            return resp.integer(self.client_id)
        if sub == b"SETINFO" and len(args) == 3:
            return OK  # Library name and version: nothing to keep them for.
        raise CommandError(
            f"ERR unknown subcommand '{args[0].decode('utf-8', 'replace')}'. Try CLIENT HELP."
        )

    def config(self, args: list[bytes]) -> bytes:
        """CONFIG GET: the few settings redis-benchmark asks about, answered truthfully enough."""
        if args[0].upper() != b"GET" or len(args) < 2:
            raise CommandError(f"ERR unknown subcommand '{args[0].decode('utf-8', 'replace')}'")
        settings = {"save": b"", "appendonly": b"no", "databases": b"1"}
        pairs = [
            (resp.bulk(name.encode()), resp.bulk(value))
            for name, value in settings.items()
            if any(
                fnmatch.fnmatchcase(name, pattern.decode("latin-1").lower()) for pattern in args[1:]
            )
        ]
        return self.encoder.map(pairs)

    def command(self, args: list[bytes]) -> bytes:
        """COMMAND [COUNT|DOCS|...]: no command documentation; redis-cli then uses its own."""
        if args and args[0].upper() == b"COUNT":
            return resp.integer(len(COMMANDS))
        if args and args[0].upper() == b"DOCS":
            return self.encoder.map([])
        return self.encoder.array([])

    def info(self, args: list[bytes]) -> bytes:
        text = (
            "# Server\r\n"
            f"redis_version:{REDIS_VERSION}\r\n"
            "redis_mode:standalone\r\n"
            f"server_name:threadserve-kv (threadserve {threadserve.__version__})\r\n"
            "# Keyspace\r\n"
            f"db0:keys={self.store.count()},expires=0\r\n"
        )
        return resp.bulk(text.encode())

    # Keys ---------------------------------------------------------------------

    def get(self, args: list[bytes]) -> bytes:
        return self.encoder.bulk_or_null(self.store.get(args[0]))

    def set(self, args: list[bytes]) -> bytes:
        """SET key value [EX seconds | PX milliseconds] [NX | XX]"""
        key, value, options = args[0], args[1], args[2:]
        expires_at: int | None = None
        condition = b""
        while options:
            option = options[0].upper()
            if option in (b"EX", b"PX") and len(options) >= 2 and expires_at is None:
                amount = parse_int(options[1])
                if amount <= 0 or amount > _INT64_MAX // 1000:
                    raise CommandError("ERR invalid expire time in 'set' command")
                expires_at = now_ms() + (amount * 1000 if option == b"EX" else amount)
                options = options[2:]
            elif option in (b"NX", b"XX") and not condition:
                condition, options = option, options[1:]
            else:
                raise CommandError("ERR syntax error")
        if not condition:
            self.store.set(key, value, expires_at)
            return OK

        def set_if(db: sqlite3.Connection) -> bool:
            exists = db.execute(
                f"SELECT 1 FROM kv WHERE key = ? AND {LIVE}", (key, now_ms())
            ).fetchone()
            if (exists is None) != (condition == b"NX"):
                return False
            db.execute(
                "INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                (key, value, expires_at),
            )
            return True

        return OK if self.store.write(set_if) else self.encoder.null

    def delete(self, args: list[bytes]) -> bytes:
        return resp.integer(self.store.delete(args))

    def exists(self, args: list[bytes]) -> bytes:
        found = self.store.get_many(args)
        return resp.integer(sum(key in found for key in args))  # EXISTS k k counts twice.

    def incr(self, args: list[bytes]) -> bytes:
        return self._increment(args[0], 1)

    def decr(self, args: list[bytes]) -> bytes:
        return self._increment(args[0], -1)

    def incrby(self, args: list[bytes]) -> bytes:
        return self._increment(args[0], parse_int(args[1]))

    def decrby(self, args: list[bytes]) -> bytes:  # redis-py sends it for DECR.
        return self._increment(args[0], -parse_int(args[1]))

    def _increment(self, key: bytes, by: int) -> bytes:
        def increment(db: sqlite3.Connection) -> int:
            row = db.execute(
                f"SELECT value, expires_at FROM kv WHERE key = ? AND {LIVE}", (key, now_ms())
            ).fetchone()
            current, expires_at = (0, None) if row is None else (parse_int(bytes(row[0])), row[1])
            result = current + by
            if not _INT64_MIN <= result <= _INT64_MAX:
                raise CommandError("ERR increment or decrement would overflow")
            db.execute(  # The key keeps its time to live, as in Redis.
                "INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                (key, b"%d" % result, expires_at),
            )
            return result

        return resp.integer(self.store.write(increment))

    def mget(self, args: list[bytes]) -> bytes:
        found = self.store.get_many(args)
        return self.encoder.array([self.encoder.bulk_or_null(found.get(key)) for key in args])

    def mset(self, args: list[bytes]) -> bytes:
        if len(args) % 2:
            raise CommandError("ERR wrong number of arguments for 'mset' command")
        pairs = [(args[i], args[i + 1]) for i in range(0, len(args), 2)]
        self.store.write(
            lambda db: db.executemany(
                "INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, NULL)", pairs
            )
        )
        return OK

    def expire(self, args: list[bytes]) -> bytes:
        """EXPIRE key seconds: 1 if the key exists (a time of 0 or less deletes it), else 0."""
        key, seconds = args[0], parse_int(args[1])
        if len(args) > 2:
            raise CommandError("ERR EXPIRE options (NX, XX, GT, LT) are not supported")
        if seconds <= 0:
            return resp.integer(self.store.delete([key]))
        if seconds > _INT64_MAX // 1000 - now_ms():
            raise CommandError("ERR invalid expire time in 'expire' command")
        updated = self.store.write(
            lambda db: (
                db.execute(
                    f"UPDATE kv SET expires_at = ? WHERE key = ? AND {LIVE}",
                    (now_ms() + seconds * 1000, key, now_ms()),
                ).rowcount
            )
        )
        return resp.integer(updated)

    def ttl(self, args: list[bytes]) -> bytes:
        """TTL key: seconds left (rounded as Redis does), -1 if none, -2 if no such key."""
        left = self.store.ttl_ms(args[0])
        if left is None:
            return resp.integer(-2)
        return resp.integer(-1 if left < 0 else (left + 500) // 1000)

    def dbsize(self, args: list[bytes]) -> bytes:
        return resp.integer(self.store.count())

    def flushdb(self, args: list[bytes]) -> bytes:
        if args and args[0].upper() not in (b"SYNC", b"ASYNC"):
            raise CommandError("ERR syntax error")
        self.store.flush()
        return OK


# Name: (method, arity). Arity counts the command name, as Redis's does: a
# positive arity is exact, a negative one is a minimum.
COMMANDS: dict[bytes, tuple[Callable[[Session, list[bytes]], bytes], int]] = {
    b"PING": (Session.ping, -1),
    b"ECHO": (Session.echo, 2),
    b"QUIT": (Session.quit, -1),
    b"SELECT": (Session.select, 2),
    b"HELLO": (Session.hello, -1),
    b"CLIENT": (Session.client, -2),
    b"CONFIG": (Session.config, -2),
    b"COMMAND": (Session.command, -1),
    b"INFO": (Session.info, -1),
    b"GET": (Session.get, 2),
    b"SET": (Session.set, -3),
    b"DEL": (Session.delete, -2),
    b"EXISTS": (Session.exists, -2),
    b"INCR": (Session.incr, 2),
    b"INCRBY": (Session.incrby, 3),
    b"DECR": (Session.decr, 2),
    b"DECRBY": (Session.decrby, 3),
    b"MGET": (Session.mget, -2),
    b"MSET": (Session.mset, -3),
    b"EXPIRE": (Session.expire, -3),
    b"TTL": (Session.ttl, 2),
    b"DBSIZE": (Session.dbsize, 1),
    b"FLUSHDB": (Session.flushdb, -1),
}


def answer(session: Session, parser: RequestParser, data: bytes) -> tuple[bytes, bool]:
    """Feed received bytes; return the replies they call for, and whether to close now.

    Replies to pipelined commands go out together, in order, in one send.
    """
    parser.feed(data)
    replies = bytearray()
    try:
        for command in parser.commands():
            replies += session.execute(command)
            if session.closing:
                return bytes(replies), True
    except ProtocolError as exc:
        # The stream cannot be resynchronised: answer what came before, say why, close.
        replies += resp.error(f"ERR Protocol error: {exc}")
        return bytes(replies), True
    return bytes(replies), False


# ---------------------------------------------------------------------- the server


class KeyValueHandler:
    """The threadserve handler: one client, on its own thread, with its own SQLite connection."""

    def __init__(self, database: Database, limits: Limits | None = None) -> None:
        self.database = database
        self.limits = limits or Limits()
        self._ids = itertools.count(1)  # next() on it is atomic: ids are unique across threads.

    def __call__(self, conn: threadserve.Connection) -> None:
        with self.database.connect() as store:
            session = Session(store, client_id=next(self._ids))
            parser = RequestParser(self.limits)
            # Iteration ends at the client's EOF, or once the server stops and
            # every byte the client had sent is read; threadserve then sends
            # the goodbye notice after our last reply.
            for data in conn:
                replies, close = answer(session, parser, data)
                if replies:
                    conn.sendall(replies)
                if close:
                    return


def build_parser() -> argparse.ArgumentParser:
    parser = _run.arguments(
        "kv",
        "A Redis-protocol key-value server on threadserve, stored in SQLite.",
        bind="127.0.0.1:6379",
        max_connections=None,
        epilog="example: python examples/kv.py --bind 127.0.0.1:6380 --db kv.sqlite3",
    )
    parser.add_argument("--db", default="kv.sqlite3", metavar="FILE", help="the SQLite file")
    parser.add_argument(
        "--synchronous",
        choices=["normal", "full"],
        default="normal",
        help="normal: commits survive the process ending (the default); full: also power loss",
    )
    parser.add_argument("--idle-timeout", type=float, default=None, help="close idle clients")
    parser.add_argument(
        "--max-bulk", type=int, default=Limits.max_bulk, help="largest argument, in bytes"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _run.parse(build_parser(), argv)
    handler = KeyValueHandler(Database(args.db, args.synchronous), Limits(max_bulk=args.max_bulk))
    with _run.start_up_errors("kv"):
        report = threadserve.serve(
            handler,
            args.bind,
            grace=args.grace,
            goodbye=GOODBYE,
            notices=NOTICES,
            max_connections=args.max_connections,
            timeouts=threadserve.Timeouts(idle=args.idle_timeout),
        )
    return _run.exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
