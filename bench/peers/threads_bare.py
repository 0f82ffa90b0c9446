"""Peer: the bare thread-per-connection loop, the thread model's own ceiling.

The seed article's `ClientEchoThread` loop with nothing else: no print, no
limits, no stop handling, no registry. Each accepted socket gets a thread that
runs `recv`/`sendall` until EOF (for the blocking workload, a 10 ms
`time.sleep` before each reply). threadserve runs the same thread model with
its safety added (limits, timeouts, the stop contract), so the gap between the
two is what that safety costs. Threads are daemons so SIGTERM ends the process
at once, as with the seed.
"""

from __future__ import annotations

import socket
import threading
import time

from bench.peers._common import BLOCKING_SECONDS, parse_args


def echo(client: socket.socket) -> None:
    with client:
        try:
            while data := client.recv(65536):
                client.sendall(data)
        except OSError:
            pass  # a client that resets ends its connection, nothing more


def blocking_echo(client: socket.socket) -> None:
    with client:
        try:
            while data := client.recv(65536):
                time.sleep(BLOCKING_SECONDS)
                client.sendall(data)
        except OSError:
            pass


def main() -> None:
    args = parse_args(__doc__ or "")
    handler = blocking_echo if args.workload == "blocking" else echo
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((args.host, args.port))
        # The seed's listen() default, min(SOMAXCONN, 128).
        server.listen()
        while True:
            client, _addr = server.accept()
            threading.Thread(target=handler, args=(client,), daemon=True).start()


if __name__ == "__main__":
    main()
