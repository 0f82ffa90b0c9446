"""Echo throughput with Prometheus metrics on against off, in the same run.

    .venv/bin/python -m bench.metrics_overhead [--seconds 5] [--repeats 3]

Two workloads, each against ``threadserve serve echo`` in its own process:

- ``echo``: 10 long-lived connections, 64-byte ping-pong (the per-message path);
- ``churn``: a new connection per 64-byte request (the per-connection path,
  where the closing counters and the duration histogram are updated).

With metrics on, the server also runs ``--metrics`` and is scraped once a
second during the run, as Prometheus would (the scrapes' CPU counts too).
The server is pinned to CPU 0 and the clients to CPU 1 when there are two
CPUs (taskset), runs alternate off/on, each after a warm-up, and the medians
and their ratio are printed: requests per second, and the server's CPU time
per request (from /proc), which a busy machine disturbs less than the rate.
Run it under ``nice -n -20`` (as root) on a shared machine.
Loopback only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.server import free_port, process_cpu_seconds, stop_process

PAYLOAD = b"x" * 63 + b"\n"
CLIENT_PROCESSES = 2


class Server:
    """``threadserve serve echo`` in a subprocess, pinned to CPU 0 if it can be.

    Both runs log at WARNING (no line per connection), so ports are chosen
    here rather than read from the INFO "serving on" line.
    """

    def __init__(self, metrics: bool) -> None:
        self.port = free_port()
        args = [sys.executable, "-m", "threadserve", "serve", "echo"]
        args += ["--bind", f"127.0.0.1:{self.port}", "--log-level", "warning"]
        args += ["--max-connections", "2000"]
        self.metrics_url: str | None = None
        if metrics:
            metrics_port = free_port()
            args += ["--metrics", f"127.0.0.1:{metrics_port}"]
            self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
            args = ["taskset", "-c", "0", *args]
        # Kept open for the server's lifetime (closed in stop()).
        self._log = tempfile.NamedTemporaryFile(prefix="threadserve-bench-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                if self.metrics_url:
                    urllib.request.urlopen(self.metrics_url, timeout=5).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    output = Path(self._log.name).read_text()
                    raise RuntimeError(f"server did not start:\n{output}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


def _pin_client() -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})


def _echo_client(
    port: int, seconds: float, connections: int, out: multiprocessing.Queue[int]
) -> None:
    """Ping-pong on long-lived connections, all in flight at once; counts round trips."""
    _pin_client()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sock in socks:
            sock.sendall(PAYLOAD)
        for sock in socks:
            received = 0
            while received < len(PAYLOAD):
                chunk = sock.recv(65536)
                if not chunk:
                    raise EOFError("server closed")
                received += len(chunk)
        done += len(socks)
    for sock in socks:
        sock.close()
    out.put(done)


def _churn_client(
    port: int, seconds: float, _connections: int, out: multiprocessing.Queue[int]
) -> None:
    """One connection per request: connect, 64 bytes there and back, close."""
    _pin_client()
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(PAYLOAD)
            received = 0
            while received < len(PAYLOAD):
                chunk = sock.recv(65536)
                if not chunk:
                    raise EOFError("server closed")
                received += len(chunk)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # The server's EOF: its side is done before the next one.
        done += 1
    out.put(done)


WORKLOADS = {"echo": _echo_client, "churn": _churn_client}


def run_once(workload: str, metrics: bool, seconds: float, warmup: float) -> tuple[float, float]:
    """Requests per second for one server process (after a warm-up run against it),
    and the server's CPU microseconds per request in the measured run.

    On a busy machine the rate swings with whatever else runs; the CPU the
    server spends per request is the steadier figure of what it costs.
    """
    server = Server(metrics)
    scrapes = 0
    stop_scraping = threading.Event()

    def scrape() -> None:
        nonlocal scrapes
        while server.metrics_url and not stop_scraping.wait(1.0):
            with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
                response.read()
            scrapes += 1

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        rates = []
        cpu_per_request = 0.0
        for duration in (warmup, seconds):
            cpu_before = process_cpu_seconds(server.process.pid)
            out: multiprocessing.Queue[int] = multiprocessing.Queue()
            clients = [
                multiprocessing.Process(
                    target=WORKLOADS[workload], args=(server.port, duration, 5, out)
                )
                for _ in range(CLIENT_PROCESSES)
            ]
            for client in clients:
                client.start()
            total = sum(out.get(timeout=duration + 60) for _ in clients)
            for client in clients:
                client.join(30)
            rates.append(total / duration)
            cpu_per_request = (process_cpu_seconds(server.process.pid) - cpu_before) / total * 1e6
        return rates[-1], cpu_per_request
    finally:
        stop_scraping.set()
        scraper.join(15)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # What the runs shared the machine with: a busy machine widens the spread.
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"niceness {os.nice(0)}, load average {load}, {os.cpu_count()} CPUs")
    print(f"{'workload':8} {'metrics off':>14} {'metrics on':>14} {'on/off':>8}")
    for workload in WORKLOADS:
        results: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for metrics in (False, True):  # Interleaved, so drift hits both alike.
                rate, cpu_us = run_once(workload, metrics, args.seconds, args.warmup)
                results[metrics].append(rate)
                cpu[metrics].append(cpu_us)
        off, on = (statistics.median(results[flag]) for flag in (False, True))
        pairs = list(zip(results[False], results[True], strict=True))
        cpu_off, cpu_on = (statistics.median(cpu[flag]) for flag in (False, True))
        cpu_pairs = list(zip(cpu[False], cpu[True], strict=True))
        print(
            f"{workload:8} {off:12,.0f}/s {on:12,.0f}/s {on / off:8.3f}"
            f"   (off runs: {', '.join(f'{r:,.0f}' for r in results[False])};"
            f" on runs: {', '.join(f'{r:,.0f}' for r in results[True])};"
            f" on/off per repeat: {', '.join(f'{b / a:.3f}' for a, b in pairs)})",
            flush=True,
        )
        print(
            f"{'':8} {cpu_off:10.1f} µs/req {cpu_on:10.1f} µs/req {cpu_on / cpu_off:8.3f}"
            f"   server CPU per request (on/off per repeat:"
            f" {', '.join(f'{b / a:.3f}' for a, b in cpu_pairs)})",
            flush=True,
        )


if __name__ == "__main__":
    main()
