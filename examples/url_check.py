"""A URL checker: ``requests`` in a handler, one blocking HTTP request per line.

The client sends one URL per line; the server fetches it and answers one line:

    <status> <length>    the HTTP status and the body's length in bytes, e.g. "200 5120"
    ERR <reason>         the URL could not be fetched (bad URL, refused, timeout, ...)

Each connection thread has its own ``requests.Session`` (kept in a
``threading.local``), so a client checking many URLs on one host reuses one
keep-alive connection, and no two threads share a session. Every request has
a connect and a read timeout, and a body larger than ``--max-body`` is not
read to the end.

Stopping: a request in flight is abandoned at once. Its cancel hook
(``conn.on_cancel``) shuts down the sockets the thread's session has open,
which wakes a ``recv`` blocked waiting for headers or body; the body is also
read in chunks with the cancel token checked between them. The client is
told ``ERR cancelled: server stopping``, then gets the server's goodbye
notice. Only a connect in progress is not interrupted: the connect timeout
(default 3 s, under the 5 s grace period) bounds it.

Run it::

    python examples/url_check.py --bind 127.0.0.1:7001

This server fetches whatever its clients ask for: keep it on an address
only trusted clients reach. Proxy settings from the environment are ignored
(a proxied request could not be abandoned the same way).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

import _run  # The options, logging and exit status the examples share.
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection

import threadserve

logger = logging.getLogger("url_check")

MAX_URL = 2048
CHUNK = 16 * 1024
CANCELLED = b"ERR cancelled: server stopping\n"


class OpenConnections:
    """The HTTP connections one thread's session has open, for its cancel hook to shut down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: set[HTTPConnection] = set()

    def add(self, connection: HTTPConnection) -> None:
        with self._lock:
            self._connections.add(connection)

    def discard(self, connection: HTTPConnection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def shut_down(self) -> None:
        """Wake whatever the owning thread is blocked on: its reads return or raise at once.

        ``shutdown``, not ``close``: closing a socket another thread is
        reading from wakes nothing on Linux. The base class's ``shutdown`` is
        called on TLS sockets too, so it acts on the descriptor without
        touching the TLS state the reading thread is using.
        """
        with self._lock:
            sockets = [c.sock for c in self._connections if c.sock is not None]
        for sock in sockets:
            # OSError: already closed or never connected, nothing to wake.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


_local = threading.local()


def thread_connections() -> OpenConnections:
    """The calling thread's ``OpenConnections``."""
    connections: OpenConnections | None = getattr(_local, "connections", None)
    if connections is None:
        connections = _local.connections = OpenConnections()
    return connections


def _register(connection: HTTPConnection) -> OpenConnections:
    registry = thread_connections()  # connect() runs in the thread that makes the request.
    registry.add(connection)
    return registry


class _TrackedHTTPConnection(HTTPConnection):
    """A urllib3 connection listed in its thread's ``OpenConnections`` while open."""

    _registry: OpenConnections | None = None

    def connect(self) -> None:
        super().connect()
        self._registry = _register(self)

    def close(self) -> None:
        if self._registry is not None:
            self._registry.discard(self)
        super().close()


class _TrackedHTTPSConnection(_TrackedHTTPConnection, HTTPSConnection):
    """The same for TLS: the tracking methods come first, then urllib3's TLS connect."""


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection


class TrackingAdapter(HTTPAdapter):
    """A requests adapter whose connections register themselves (see ``OpenConnections``)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def thread_session() -> requests.Session:
    """The calling thread's session, made on first use."""
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        session.trust_env = False  # No proxies from the environment: see the module notes.
        session.max_redirects = 5
        adapter = TrackingAdapter(pool_connections=4, pool_maxsize=4)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _local.session = session
    return session


def close_thread_session() -> None:
    session: requests.Session | None = getattr(_local, "session", None)
    if session is not None:
        session.close()
        _local.session = None


class Checker:
    """The handler: one URL per line in, one status line out."""

    def __init__(self, connect_timeout: float, read_timeout: float, max_body: int) -> None:
        self.timeout = (connect_timeout, read_timeout)
        self.max_body = max_body

    def __call__(self, conn: threadserve.Connection) -> None:
        unregister = conn.on_cancel(thread_connections().shut_down)
        try:
            while line := conn.readline(limit=MAX_URL + 2):
                conn.sendall(self.check(conn, line.strip()))
        finally:
            unregister()
            close_thread_session()

    def check(self, conn: threadserve.Connection, line: bytes) -> bytes:
        """The reply line for one requested URL."""
        url = line.decode("ascii", errors="replace")
        if not url.startswith(("http://", "https://")) or any(c.isspace() for c in url):
            return b"ERR bad url: expected one http:// or https:// URL per line\n"
        if conn.cancelled:
            return CANCELLED
        try:
            with thread_session().get(url, timeout=self.timeout, stream=True) as response:
                length = 0
                for chunk in response.iter_content(CHUNK):
                    if conn.cancelled:
                        return CANCELLED
                    length += len(chunk)
                    if length > self.max_body:
                        return f"ERR body larger than {self.max_body} bytes\n".encode()
                if conn.cancelled:  # The body may have been cut short by the hook.
                    return CANCELLED
                return f"{response.status_code} {length}\n".encode()
        except requests.RequestException as exc:
            if conn.cancelled:
                return CANCELLED
            logger.info("%s: %s: %s", conn.peer, url, exc)
            return b"ERR " + describe(exc) + b"\n"


def describe(exc: requests.RequestException) -> bytes:
    """A short reason for an error line (the full one goes to the log)."""
    if isinstance(exc, requests.ConnectTimeout):
        return b"connect timeout"
    if isinstance(exc, requests.ReadTimeout):
        return b"read timeout"
    if isinstance(exc, requests.TooManyRedirects):
        return b"too many redirects"
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.URLRequired)):
        return b"bad url"
    if isinstance(exc, requests.exceptions.SSLError):
        return b"tls error"
    if isinstance(exc, requests.ConnectionError):
        return b"connection failed"
    return b"request failed"


def build_parser() -> argparse.ArgumentParser:
    parser = _run.arguments(
        "url_check",
        "Answer each URL line with '<status> <length>'.",
        bind="127.0.0.1:7001",
        max_connections=100,
    )
    parser.add_argument("--connect-timeout", type=float, default=3.0, help="seconds (default: 3)")
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=10.0,
        help="seconds without a byte from the web server (default: 10)",
    )
    parser.add_argument(
        "--max-body", type=int, default=10 * 1024 * 1024, help="bytes (default: 10 MiB)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _run.parse(build_parser(), argv)
    with _run.start_up_errors("url_check"):
        report = threadserve.serve(
            Checker(args.connect_timeout, args.read_timeout, args.max_body),
            args.bind,
            max_connections=args.max_connections,
            grace=args.grace,
        )
    return _run.exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
