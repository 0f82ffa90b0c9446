"""What the per-connection write lock costs: ``Connection.sendall`` with it against without.

    .venv/bin/python -m bench.write_lock [--requests 2000] [--repeats 100]
    .venv/bin/python -m bench.write_lock --server [--seconds 3] [--repeats 3]

``sendall`` takes a per-connection lock so that any thread may call it (see
the threading contract in ``Connection``'s docstring). "Without" is the
``sendall`` of before the lock, kept here as ``unlocked_sendall``: one
``send`` tried first, a poll only when the client is not reading.

Two measurements:

- in-process (the default): one thread, a socketpair, a ``Connection`` on
  one end and a plain socket on the other; each request is 64 bytes sent by
  the plain socket, ``Connection.recv``, ``Connection.sendall`` of what was
  read, and the plain socket reading it back. The figure is CPU time per
  request (``time.thread_time``) over ``--repeats`` short runs of each
  variant, the two alternating run by run. The machine this runs on is busy:
  CPU time is what other work inflates least, and the cost of the lock is
  the median of the differences between back-to-back runs. A third
  variant wraps the old ``sendall`` in a ``threading.Lock``, the obvious
  lock, which ``WriteLock`` (_writelock.py) replaced for being too dear.
- ``--server``: ``threadserve serve echo`` in a subprocess pinned to CPU 0,
  with and without the lock (the subprocess replaces ``Connection.sendall``
  with ``unlocked_sendall`` before serving), driven by the compiled load
  generator of ``python -m bench`` pinned to CPU 1 (10 connections, 64 bytes).
  It reports requests per second and the server's CPU time per request,
  medians over interleaved repeats.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable

from threadserve import Connection, Timeouts
from threadserve._connection import _WOULD_BLOCK

PAYLOAD = b"x" * 63 + b"\n"


def unlocked_sendall(self: Connection, data: bytes | bytearray | memoryview) -> None:
    """``Connection.sendall`` as it was before the write lock (not safe from several threads)."""
    total = len(data) if type(data) is bytes else memoryview(data).nbytes
    try:
        sent = self._sock.send(data)
    except _WOULD_BLOCK:
        sent = 0
    if sent < total:
        view = memoryview(data).cast("B")
        while sent < total:
            self._wait_writable()
            sent += self._send_some(view[sent:])
    self.bytes_sent += total


def threading_lock_sendall(self: Connection, data: bytes | bytearray | memoryview) -> None:
    """The unlocked ``sendall`` inside a ``threading.Lock``: what the list-token lock replaced.

    One lock for the whole process, which is enough for the one connection
    the in-process measurement uses. Calling the unlocked ``sendall`` rather
    than repeating its loop adds one Python call to this variant's figure
    (about 50 ns per request on Python 3.11 here, against the 350-450 ns the
    lock adds).
    """
    with _THREADING_LOCK:
        unlocked_sendall(self, data)


_THREADING_LOCK = threading.Lock()


def install_unlocked() -> None:
    """Make every Connection in this process write without the lock (for the server run)."""
    Connection.sendall = unlocked_sendall  # type: ignore[method-assign]


# ---------------------------------------------------------------- in-process


class _Pair:
    """A Connection on one end of a socketpair, a plain socket on the other."""

    def __init__(self) -> None:
        ours, self.theirs = socket.socketpair()
        ours.setblocking(False)
        self.stop_fd = os.eventfd(0)
        self.conn = Connection(ours, "bench", stop_fd=self.stop_fd, timeouts=Timeouts())

    def run(self, requests: int, send: Callable[[Connection, bytes], None]) -> float:
        """CPU seconds per request for ``requests`` round trips."""
        conn = self.conn
        recv, peer_send, peer_recv = conn.recv, self.theirs.send, self.theirs.recv
        started = time.thread_time()
        for _ in range(requests):
            peer_send(PAYLOAD)
            send(conn, recv(65536))
            peer_recv(65536)
        return (time.thread_time() - started) / requests

    def close(self) -> None:
        self.conn._close_socket()
        self.theirs.close()
        os.close(self.stop_fd)


def in_process(requests: int, rounds: int) -> dict[str, list[float]]:
    """Per-round CPU seconds per request of each variant; the two alternate within each round."""
    variants: dict[str, Callable[[Connection, bytes], None]] = {
        "with lock": Connection.sendall,
        "without lock": unlocked_sendall,
        "threading.Lock": threading_lock_sendall,
    }
    pair = _Pair()
    try:
        for send in variants.values():  # Warm both paths before measuring them.
            pair.run(2000, send)
        results: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(rounds):
            order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in order:
                results[name].append(pair.run(requests, variants[name]))
        return results
    finally:
        pair.close()


# ---------------------------------------------------------------- server


# Both variants start the same way, so the only difference is ``sendall``.
_SERVE = (
    "import sys; import bench.write_lock as w; {install}"
    " from threadserve.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _server_run(locked: bool, seconds: float) -> tuple[float, float]:
    """(requests per second, server CPU µs per request) for one fresh server process."""
    from bench.build import build_all
    from bench.client import run_echo
    from bench.server import ServerProcess, free_port

    loadgen = build_all()["loadgen"]
    port = free_port()
    serve = ["serve", "echo", "--bind", f"127.0.0.1:{port}", "--log-level", "warning"]
    code = _SERVE.format(install="" if locked else "w.install_unlocked();")
    with ServerProcess([sys.executable, "-c", code, *serve], port, cpu=0) as process:
        process.wait_listening(30)

        def echo(warmup: float, duration: float) -> dict[str, object]:
            return run_echo(
                loadgen,
                port=port,
                conns=10,
                size=64,
                connect_timeout=10.0,
                warmup=warmup,
                duration=duration,
                server_pid=process.pid,
                cpu=1,
            )

        # A throwaway run first: a fresh interpreter is slower for its first seconds.
        echo(0.2, 1.0)
        cpu_before = process.cpu_seconds()
        result = echo(0.0, seconds)
        cpu = process.cpu_seconds() - cpu_before
        process.check_alive()
        requests = float(str(result["requests"]))
        return requests / seconds, cpu / requests * 1e6


def server(seconds: float, repeats: int) -> dict[str, tuple[float, float]]:
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for repeat in range(repeats):
        for locked in (True, False) if repeat % 2 == 0 else (False, True):
            rate, cpu = _server_run(locked, seconds)
            runs[locked].append((rate, cpu))
            name = "with lock" if locked else "without lock"
            print(f"  {name:14}{rate:12,.0f} requests/s{cpu:8.2f} µs", file=sys.stderr)
    return {
        "with lock" if locked else "without lock": (
            statistics.median(rate for rate, _ in results),
            statistics.median(cpu for _, cpu in results),
        )
        for locked, results in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="round trips per run")
    parser.add_argument("--repeats", type=int, default=None, help="runs per variant")
    parser.add_argument("--server", action="store_true", help="measure a served echo instead")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    args = parser.parse_args()
    if args.server:
        served = server(args.seconds, args.repeats or 3)
        print(f"{'':14}{'requests/s':>12}{'server CPU/request':>20}")
        for name, (rate, cpu) in served.items():
            print(f"{name:14}{rate:12,.0f}{cpu:17.2f} µs")
        locked, unlocked = served["with lock"], served["without lock"]
        print(
            f"with/without: throughput {locked[0] / unlocked[0]:.3f}, "
            f"CPU per request {locked[1] / unlocked[1]:.3f}"
        )
        return
    rounds = args.repeats or 100
    results = in_process(args.requests, rounds)
    for name, runs in results.items():
        print(
            f"{name:15}best {min(runs) * 1e6:6.3f} µs, median {statistics.median(runs) * 1e6:6.3f}"
            f" µs CPU per request ({rounds} runs of {args.requests})"
        )
    # Each round ran both variants back to back, under the same load from
    # the rest of the machine: the median of their differences is the cost.
    base = statistics.median(results["without lock"])
    for name in ("with lock", "threading.Lock"):
        diffs = [a - b for a, b in zip(results[name], results["without lock"], strict=True)]
        cost = statistics.median(diffs)
        print(
            f"{name} adds {cost * 1e9:.0f} ns per request"
            f" (median of paired differences, {cost / base:+.1%})"
        )


if __name__ == "__main__":
    main()
