"""Peer: the standard library's `socketserver.ThreadingTCPServer`.

Written the way its documentation shows: a `BaseRequestHandler` subclass and
`serve_forever()`. Settings are left at their defaults (listen backlog 5,
`daemon_threads` False), as most code that uses it does. SIGTERM is not
handled, so the process dies at once.
"""

from __future__ import annotations

import socketserver
import time

from bench.peers._common import BLOCKING_SECONDS, parse_args


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        while True:
            data = sock.recv(65536)
            if not data:
                return
            sock.sendall(data)


class BlockingEchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        while True:
            data = sock.recv(65536)
            if not data:
                return
            time.sleep(BLOCKING_SECONDS)
            sock.sendall(data)


class Server(socketserver.ThreadingTCPServer):
    # Without it a restart right after a run fails with EADDRINUSE.
    allow_reuse_address = True


def main() -> None:
    args = parse_args(__doc__ or "")
    handler = EchoHandler if args.workload == "echo" else BlockingEchoHandler
    with Server((args.host, args.port), handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
