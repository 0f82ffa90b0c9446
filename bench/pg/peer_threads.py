"""The seed article's loop with psycopg: accept, one bare thread per client, recv/sendall.

No limits, no graceful stop (SIGTERM kills it), nothing but the thread model:
the gap between this and threadserve is what threadserve's safety costs.

    python -m bench.pg.peer_threads --port P --dsn DSN --pool N
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

import psycopg_pool

from .common import arguments
from .psycopg_peer import answer, open_pool


def serve_client(sock: socket.socket, pool: psycopg_pool.ConnectionPool[Any]) -> None:
    buffer = b""
    # ConnectionError: the load generator resets what is in flight when it ends.
    with sock, contextlib.suppress(ConnectionError):
        while data := sock.recv(65536):
            buffer += data
            while (end := buffer.find(b"\n")) >= 0:
                line, buffer = buffer[:end], buffer[end + 1 :]
                sock.sendall(answer(pool, line))


def main() -> None:
    parser = arguments(__doc__, "bench threads")
    parser.add_argument("--pool", type=int, required=True)
    args = parser.parse_args()
    pool = open_pool(args.dsn, args.pool, args.name)
    listener = socket.create_server(("127.0.0.1", args.port), backlog=4096)
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve_client, args=(sock, pool), daemon=True).start()


if __name__ == "__main__":
    main()
