"""Peer: gevent's `StreamServer`, one greenlet per connection.

Monkey-patching comes first, before anything imports socket, threading or
time, as gevent requires: after it the blocking workload's plain
`time.sleep` is gevent's cooperative sleep, which is the point of gevent.
SIGTERM is not handled.
"""

from gevent import monkey

monkey.patch_all()

# The imports below must follow patch_all(), hence the E402 waivers.
import socket  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from gevent.server import StreamServer  # noqa: E402

from bench.peers._common import BLOCKING_SECONDS, parse_args  # noqa: E402


def echo(sock: socket.socket, _address: Any) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


def blocking_echo(sock: socket.socket, _address: Any) -> None:
    while data := sock.recv(65536):
        time.sleep(BLOCKING_SECONDS)
        sock.sendall(data)


def main() -> None:
    args = parse_args(__doc__ or "")
    handler = echo if args.workload == "echo" else blocking_echo
    # gevent's default backlog is 256; left as is.
    server = StreamServer((args.host, args.port), handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
