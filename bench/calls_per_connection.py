"""How many Python-level calls threadserve makes per short connection.

    .venv/bin/python -m bench.calls_per_connection [--connections 2000] [--top 40]

An in-process ``Server`` running the built-in echo handler serves
``--connections`` short connections (connect, 64 bytes echoed, close) from
four client processes, while a profile hook in every thread counts function
calls: Python functions and the C functions they call (``len``, a lock's
``__exit__``, ``socket.recv``). A warm-up of 200 connections runs first, so
threads are already parked and counted calls are the steady state.

Why calls and not time: this machine's speed moves by more than the
per-connection trims do, but the number of calls is the same in every run.
It is how the per-connection path is kept lean: 154 calls per connection
before the trims of commit 996b245 (an Event, a Condition and an outbox made
for every connection whether used or not), 131-133 after; 122 before
``Listener.accept`` (socket.accept's enum and default-timeout reads) and the
switch interval's early return, 109 after (112 once admission went
through ``Acceptor.settle``, two calls more). The hook slows
the server down a lot, so no time is reported; ``python -m bench
--workloads short`` measures the rate.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import socket
import sys
import threading
import time
from types import FrameType

import threadserve

PAYLOAD = b"x" * 64
CLIENT_PROCESSES = 4
WARM_UP = 200

#: (file, first line, name) of a Python function; ("C", 0, name) of a C one.
CallSite = tuple[str, int, str]


class CallCounter:
    """A ``sys.setprofile`` hook that counts calls while ``counting`` is set."""

    def __init__(self) -> None:
        self.counts: collections.Counter[CallSite] = collections.Counter()
        self.counting = False

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if not self.counting:
            return
        if event == "call":
            code = frame.f_code
            self.counts[
                (code.co_filename.rsplit("/", 1)[-1], code.co_firstlineno, code.co_name)
            ] += 1
        elif event == "c_call":
            self.counts[("C", 0, getattr(arg, "__qualname__", repr(arg)))] += 1


def short_connections(host: str, port: int, count: int) -> None:
    """Connect, echo 64 bytes, close; ``count`` times (runs in a client process)."""
    for _ in range(count):
        with socket.create_connection((host, port), timeout=10) as client:
            client.sendall(PAYLOAD)
            received = 0
            while received < len(PAYLOAD):
                chunk = client.recv(len(PAYLOAD))
                if not chunk:
                    raise ConnectionError("the server closed before echoing")
                received += len(chunk)


def run_clients(host: str, port: int, total: int, processes: int) -> None:
    context = multiprocessing.get_context("fork")
    clients = [
        context.Process(target=short_connections, args=(host, port, total // processes))
        for _ in range(processes)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(120)
        if client.exitcode != 0:
            raise SystemExit(f"a client process failed (exit code {client.exitcode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--top", type=int, default=40, help="call sites to list")
    args = parser.parse_args()
    measured = args.connections - args.connections % CLIENT_PROCESSES
    if measured <= 0:
        parser.error(f"--connections must be at least {CLIENT_PROCESSES}")

    counter = CallCounter()
    server = threadserve.Server(threadserve.echo, "127.0.0.1:0", handle_signals=False)
    threading.setprofile(counter)
    sys.setprofile(counter)
    server.start()
    try:
        host, port = server.addresses[0].rsplit(":", 1)
        run_clients(host, int(port), WARM_UP, 1)
        counter.counting = True
        run_clients(host, int(port), measured, CLIENT_PROCESSES)
        # The last connections' threads may still be closing and parking.
        deadline = time.monotonic() + 10
        while server.statistics().connections_active and time.monotonic() < deadline:
            time.sleep(0.01)
        counter.counting = False
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        server.stop()

    total = sum(counter.counts.values())
    python = sum(n for site, n in counter.counts.items() if site[0] != "C")
    print(f"{measured} short connections, Python {sys.version.split()[0]}")
    per_connection, to_python = total / measured, python / measured
    print(f"calls per connection: {per_connection:.1f} ({to_python:.1f} to Python functions)")
    print()
    print("per connection  call site")
    for (where, line, name), count in counter.counts.most_common(args.top):
        site = name if where == "C" else f"{name} ({where}:{line})"
        print(f"{count / measured:14.2f}  {site}")


if __name__ == "__main__":
    main()
