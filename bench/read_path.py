"""What a read through ``Connection`` costs over a bare ``socket.recv``, per message.

    .venv/bin/python -m bench.read_path [--messages 20000] [--repeats 30]

One thread, a socketpair: a plain socket sends a 1 KiB message, and the
other end reads it, in three ways:

- ``socket.recv``: the bare loop's read (the socket blocking, as there);
- ``Connection.recv()``: a handler's explicit read;
- ``next(iter(conn))``: a handler's ``for chunk in conn``, the echo's read.

Each asks for up to 64 KiB, as the bare loop and ``Connection`` do.

The message is always there before the read, so no read waits: what is
measured is the path, not a wake-up, and the thread's CPU time
(``time.thread_time``) per message is what another busy process inflates
least. The variants alternate run by run, and each figure is the median
over ``--repeats`` runs. The C read (``_fastread``) is used where it was
built; ``THREADSERVE_PURE_PYTHON=1`` measures the pure-Python read instead.

A diagnostic for changes to the read path; the throughput a server gets is
what ``python -m bench`` measures. Within one process the medians are
steady, but from one process to the next they move by several hundred
nanoseconds on this project's 2-core machine (the same tree gave +300 and
+1,140 ns for ``Connection.recv()`` in two runs a minute apart): to compare
two trees, alternate several runs of each, pinned to one core (``taskset
-c 0``), and compare the spreads, not one run's figures.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator

from threadserve._accel import reads
from threadserve._connection import DEFAULT_CHUNK_SIZE, Connection
from threadserve._timeouts import Timeouts

MESSAGE = b"x" * 1024


def cpu_per_message(send: socket.socket, read: Callable[[], bytes], messages: int) -> float:
    """Thread CPU time per message, in nanoseconds, for ``messages`` send-and-read rounds."""
    started = time.thread_time()
    for _ in range(messages):
        send.send(MESSAGE)
        read()
    return (time.thread_time() - started) * 1e9 / messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.read_path",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    if args.messages < 1 or args.repeats < 1:
        parser.error("--messages and --repeats must be at least 1")

    bare_reader, bare_sender = socket.socketpair()
    conn_socket, conn_sender = socket.socketpair()
    conn_socket.setblocking(False)  # As the server sets it.
    stop_r, stop_w = os.pipe()  # The stop descriptor, never written here.
    conn = Connection(conn_socket, "bench", stop_fd=stop_r, timeouts=Timeouts())
    chunks: Iterator[bytes] = iter(conn)
    size = len(MESSAGE)
    # The same request size for all (the bare loop's 64 KiB is also the
    # Connection's default), and one lambda call around each read.
    variants: dict[str, tuple[socket.socket, Callable[[], bytes]]] = {
        "socket.recv": (bare_sender, lambda: bare_reader.recv(DEFAULT_CHUNK_SIZE)),
        "Connection.recv()": (conn_sender, lambda: conn.recv()),
        "next(iter(conn))": (conn_sender, lambda: next(chunks)),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    try:
        # A warm-up round that also checks each variant reads the message:
        # one that read nothing would be measured doing nothing.
        for name, (sender, read) in variants.items():
            sender.send(MESSAGE)
            if read() != MESSAGE:
                raise RuntimeError(f"{name} did not read back the {size} B sent")
        for _ in range(args.repeats):
            for name, (sender, read) in variants.items():
                results[name].append(cpu_per_message(sender, read, args.messages))
    finally:
        for sock in (bare_reader, bare_sender, conn_socket, conn_sender):
            sock.close()
        os.close(stop_r)
        os.close(stop_w)

    baseline = statistics.median(results["socket.recv"])
    print(f"reads: {reads()}; {args.repeats} runs of {args.messages} messages of {size} B")
    print("| read | CPU ns per message (median) | over socket.recv |")
    print("|---|---|---|")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} | {median - baseline:+.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
