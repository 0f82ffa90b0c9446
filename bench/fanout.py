"""Broadcast fan-out: lines per second a ``Group`` delivers, to 50 and to 500 members.

    .venv/bin/python -m bench.fanout [--members 50,500] [--seconds 5] [--repeats 3] [--line-size 64]

The server is ``examples/chat.py`` in its own process, pinned to CPU 0: each
line a client sends is broadcast to every member (the sender included). This
process, pinned to CPU 1, is every member: it connects them, then one of
them sends lines (64 bytes unless --line-size) while all of them read (one thread, epoll). The
sender keeps at most ``--window`` lines ahead of the slowest reading member,
so no reading member is ever cut off; what is measured is the server's
fan-out, as far as one reader process can take it (its CPU is reported too).

Each case also runs with one *stalled* member more: connected, in the room,
reading nothing (a 4 KiB receive buffer). It must not slow the others; the
server cuts it off once 1 MiB is queued for it, and the run says when.

Figures: lines delivered per second (members x lines, as the members
counted them), the server's CPU time per delivered line, medians over
``--repeats`` interleaved runs. Loopback only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.server import free_port, pin_prefix, process_cpu_seconds, server_env, stop_process

CHAT = Path(__file__).resolve().parent.parent / "examples" / "chat.py"
LINE_SIZE = 64
BURST = 16


@dataclass(frozen=True)
class Run:
    delivered_per_s: float
    server_cpu_us_per_line: float
    client_cpu_share: float  # This process's CPU seconds per wall second.
    cut_off_after: float | None  # Seconds into the run the stalled member was cut off.


def _start_server(port: int, max_connections: int) -> subprocess.Popen[bytes]:
    argv = [*pin_prefix(0), sys.executable, str(CHAT), "--bind", f"127.0.0.1:{port}"]
    argv += ["--log-level", "warning", "--max-connections", str(max_connections)]
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=server_env()
    )
    assert process.stderr is not None
    os.set_blocking(process.stderr.fileno(), False)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the chat server did not start") from None
            time.sleep(0.05)


def _read_until(sock: socket.socket, marker: bytes, limit: float) -> None:
    """Read and drop everything up to and including a line containing ``marker``."""
    buffer = b""
    sock.settimeout(limit)
    while marker not in buffer:
        chunk = sock.recv(1 if marker.startswith(b"*") else 65536)
        if not chunk:
            raise EOFError("the server closed a member")
        buffer += chunk
    sock.setblocking(False)


def run_once(members: int, stalled: bool, seconds: float, window: int, line_size: int) -> Run:
    port = free_port()
    server = _start_server(port, members + 100)
    socks: list[socket.socket] = []
    try:
        if hasattr(os, "sched_setaffinity") and 1 in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {1})
        for _ in range(members):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(sock)
            _read_until(sock, b"* welcome", 60)  # Sent once it is in the room.
        staller: socket.socket | None = None
        if stalled:
            staller = socket.socket()
            staller.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            staller.connect(("127.0.0.1", port))
            _read_until(staller, b"* welcome", 60)  # And not one byte more, if it can help it.
        sender = socks[0]
        # Everyone is in the room once everyone has heard this line.
        sender.sendall(b"sync\n")
        for sock in socks:
            _read_until(sock, b": sync\n", 60)
        poller = select.epoll()
        by_fd = {sock.fileno(): sock for sock in socks}
        counts = dict.fromkeys(by_fd, 0)
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        server_cpu = process_cpu_seconds(server.pid)
        own_cpu = time.process_time()
        sent = 0
        slowest = 0
        cut_off_after: float | None = None
        started = time.monotonic()
        ends = started + seconds
        sender.setblocking(True)
        burst = (b"x" * (line_size - 1) + b"\n") * BURST
        while (now := time.monotonic()) < ends:
            if sent - slowest < window:
                sender.sendall(burst)
                sent += BURST
            for fd, _events in poller.poll(0.05):
                data = by_fd[fd].recv(1 << 20)
                counts[fd] += data.count(b"\n")
            slowest = min(counts.values())
            if staller is not None and cut_off_after is None and b"cut off" in _log(server):
                cut_off_after = now - started
        elapsed = time.monotonic() - started
        delivered = sum(counts.values())
        server_cpu = process_cpu_seconds(server.pid) - server_cpu
        own_cpu = time.process_time() - own_cpu
        poller.close()
        if staller is not None:
            socks.append(staller)
        return Run(
            delivered_per_s=delivered / elapsed,
            server_cpu_us_per_line=server_cpu / delivered * 1e6,
            client_cpu_share=own_cpu / elapsed,
            cut_off_after=cut_off_after,
        )
    finally:
        for sock in socks:
            sock.close()
        stop_process(server)
        if server.stderr is not None:
            server.stderr.close()


def _log(server: subprocess.Popen[bytes]) -> bytes:
    """What the server wrote to stderr since the last look (its log, at WARNING)."""
    assert server.stderr is not None
    try:
        return os.read(server.stderr.fileno(), 65536)
    except BlockingIOError:
        return b""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", default="50,500", help="comma list of room sizes")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case")
    parser.add_argument("--window", type=int, default=512, help="most lines ahead of a reader")
    parser.add_argument("--line-size", type=int, default=LINE_SIZE, help="bytes per line sent")
    args = parser.parse_args()
    cases = [(int(m), stalled) for m in args.members.split(",") for stalled in (False, True)]
    runs: dict[tuple[int, bool], list[Run]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for members, stalled in cases:  # Interleaved: drift hits every case alike.
            runs[members, stalled].append(
                run_once(members, stalled, args.seconds, args.window, args.line_size)
            )
    print(
        f"{'members':>8} {'stalled':>8} {'lines delivered/s':>18} {'server CPU/line':>16}"
        f" {'reader CPU':>11}  stalled member cut off after"
    )
    for (members, stalled), results in runs.items():
        rate = statistics.median(r.delivered_per_s for r in results)
        cpu = statistics.median(r.server_cpu_us_per_line for r in results)
        reader = statistics.median(r.client_cpu_share for r in results)
        cuts = ", ".join(
            "-" if r.cut_off_after is None else f"{r.cut_off_after:.2f} s" for r in results
        )
        print(
            f"{members:8} {'yes' if stalled else 'no':>8} {rate:18,.0f} {cpu:13.2f} µs"
            f" {reader:10.0%}  {cuts if stalled else ''}"
        )


if __name__ == "__main__":
    main()
