"""Peer: the seed article's thread-per-connection echo server.

Its second listing (`ClientEchoThread`), kept as written: `recv(2048)`, the
`print` on every message, one thread per connection, no limits. The only
changes are the port from the command line, the optional 10 ms blocking call
for the blocking workload, and the end of the listing that the article cuts
off mid-line (closing every thread on Ctrl-C).

`print` is kept; the harness sends stdout to /dev/null, so its cost is the
formatting and a buffered write. The results record this.

SIGTERM is not handled: the process dies at once and clients see the kernel
close their sockets.
"""

from __future__ import annotations

import socket
import time
from threading import Thread

from bench.peers._common import BLOCKING_SECONDS, parse_args

BLOCKING = False


class ClientEchoThread(Thread):
    def __init__(self, client: socket.socket) -> None:
        super().__init__()
        self.client = client

    def run(self) -> None:
        try:
            # Continuously receive data from the client
            while True:
                data = self.client.recv(2048)
                # If no data is received, the connection is closed
                if not data:
                    raise BrokenPipeError("Connection closed!")
                # Print the received data
                print(f"Data received {data!r}!")
                if BLOCKING:
                    time.sleep(BLOCKING_SECONDS)
                # Send the received data back to the client
                self.client.sendall(data)

        except OSError as e:
            # Handle any OSError (e.g., connection reset by peer)
            print(f"Thread interrupted by {e} exception, shutting down!")

    def close(self) -> None:
        # Check if the thread is still running
        if self.is_alive():
            # Send a message to the client indicating the shutdown
            self.client.sendall(bytes("Shutting down!", encoding="utf-8"))
            # Shutdown the client connection for both reads and writes
            self.client.shutdown(socket.SHUT_RDWR)


def main() -> None:
    global BLOCKING
    args = parse_args(__doc__ or "")
    BLOCKING = args.workload == "blocking"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((args.host, args.port))
        server.listen()
        connection_threads = []
        try:
            while True:
                connection, _addr = server.accept()
                thread = ClientEchoThread(connection)
                connection_threads.append(thread)
                thread.start()
        except KeyboardInterrupt:
            print("Shutting down!")
            for thread in connection_threads:
                thread.close()


if __name__ == "__main__":
    main()
