"""Where a request's CPU goes: threadserve against the bare loop, split in layers.

    .venv/bin/python -m bench.cost_per_request [--rounds 3] [--cases echo:1000,blocking:1000]

Seven servers, each warmed and then measured under the same closed-loop load,
alternated round by round:

- ``threadserve``: the CLI with the built-in echo (or the bench's blocking echo);
- ``ts, pure-Python reads``: the same with ``THREADSERVE_PURE_PYTHON=1``, so
  ``Connection.recv`` waits and reads in Python instead of through the
  compiled ``_fastread`` module: the first two rows differ by what it saves;
- ``ts, --idle-timeout 300``: the CLI's echo with an idle timeout, so every
  read has a deadline to compute and a timed wait (what a deployment that
  sets one pays, against the first row);
- ``ts + bare loop``: threadserve running the bare loop's body (blocking
  ``recv``, ``sendall``) on the accepted socket itself, so only the
  Connection read/write path is left out;
- ``ts + poll/recv``: the same, reading the way the Connection does (the
  compiled ``poll_recv``: a ``poll`` on the socket and the stop descriptor,
  then a non-blocking ``recv``), without the Connection's layers in Python;
- ``threads-bare``: the seed's loop without its print, in a process of its own;
- ``asyncio-protocol``: one event loop serving every connection, the peer
  the echo goals compare against.

For each, the server process's user and system CPU per request, taken from
the kernel's accounting around the measured run (no profiler is attached:
``perf stat -p`` on a thousand threads slows them down, by different amounts
for different servers), and the context switches per request on the
server's CPU (``perf stat -C``; "n/a" without ``perf``). Medians over
rounds.

Reading it: ``threadserve`` and ``ts + bare loop`` differ by what the
Connection costs; ``ts + bare loop`` and ``threads-bare`` by what the rest
of threadserve costs; ``ts + poll/recv`` splits the Connection's cost into
the read through ``poll`` and the Python around it; ``threadserve`` and
``ts, pure-Python reads`` by what the compiled read saves; and
``threadserve`` and ``ts, --idle-timeout 300`` by what a read deadline
costs. ``threads-bare`` against ``asyncio-protocol`` is what a thread per
connection costs against one loop: a thread that waits for its own socket
is switched out and back in for every request, and the switches show in
the system time.

A diagnostic, not a published figure: ``python -m bench`` measures throughput.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.build import build_all
from bench.client import JsonDict, run_echo
from bench.peerlist import PEERS
from bench.server import ServerProcess, free_port

WARM_UP_SECONDS = 1.5
MEASURED_SECONDS = 3.0
REQUEST_SIZE = {"echo": 1024, "blocking": 64}
PERF_START_SECONDS = 0.2
SERVER_CPU = 0
LOADGEN_CPU = 1


@dataclass(frozen=True)
class Variant:
    label: str
    peer: str  # the peer as `python -m bench` runs it
    handler: str | None = None  # instead, threadserve serving this handler ({kind}: the workload's)
    env: tuple[tuple[str, str], ...] = ()  # the server's environment, on top of the usual
    options: tuple[str, ...] = ()  # more options for threadserve's CLI

    def argv(self, port: int, workload: str) -> list[str]:
        if self.handler is None:
            return [*PEERS[self.peer].command(port, workload), *self.options]
        handler = self.handler.format(kind="blocking_echo" if workload == "blocking" else "echo")
        bind = f"127.0.0.1:{port}"
        serve = ["serve", handler, "--bind", bind, "--log-level", "warning", *self.options]
        return [sys.executable, "-m", "threadserve", *serve]


VARIANTS = (
    Variant("threadserve", "threadserve"),
    Variant("ts, pure-Python reads", "threadserve", env=(("THREADSERVE_PURE_PYTHON", "1"),)),
    Variant("ts, --idle-timeout 300", "threadserve", options=("--idle-timeout", "300")),
    Variant("ts + bare loop", "threadserve", "bench.handlers:bare_socket_{kind}"),
    Variant("ts + poll/recv", "threadserve", "bench.handlers:polled_socket_{kind}"),
    Variant("threads-bare", "threads-bare"),
    Variant("asyncio-protocol", "asyncio-protocol"),
)


@dataclass(frozen=True)
class Measure:
    throughput: float
    user_us: float  # server CPU per request, microseconds
    system_us: float
    switches: float | None  # context switches per request on the server's CPU


class SwitchCounter:
    """Context switches on one CPU, counted by ``perf stat`` while the block runs.

    Counted on the server's CPU rather than per process: a thread that ends
    takes its own count with it, and the bare loop's threads end with their
    connections. The server runs alone on that CPU, so what is counted is
    its own switches (and a few of the kernel's threads). ``count`` stays
    None where ``perf`` is missing or refused.
    """

    def __init__(self, cpu: int) -> None:
        self._argv = ["perf", "stat", "-x,", "-e", "context-switches", "-C", str(cpu)]
        self._proc: subprocess.Popen[str] | None = None
        self.count: int | None = None

    def __enter__(self) -> SwitchCounter:
        if shutil.which("perf") is not None:
            self._proc = subprocess.Popen(
                self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            time.sleep(PERF_START_SECONDS)  # perf opens its counters before the load starts.
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)
        _out, err = self._proc.communicate(timeout=30)
        for line in err.splitlines():
            value, _, rest = line.partition(",")
            if "context-switches" in rest and value.isdigit():
                self.count = int(value)


def measure(variant: Variant, workload: str, conns: int, loadgen: Path) -> Measure:
    port = free_port()
    size = REQUEST_SIZE[workload]
    with ServerProcess(
        variant.argv(port, workload), port, cpu=SERVER_CPU, env=dict(variant.env)
    ) as server:
        server.wait_listening(timeout=30)

        def load(seconds: float) -> JsonDict:
            return run_echo(
                loadgen, port=port, conns=conns, size=size, warmup=0, duration=seconds,
                connect_timeout=30, server_pid=server.pid, cpu=LOADGEN_CPU,
            )  # fmt: skip

        load(WARM_UP_SECONDS)
        with SwitchCounter(SERVER_CPU) as switches:
            user_before, system_before = server.cpu_times()
            result = load(MEASURED_SECONDS)
            user_after, system_after = server.cpu_times()
        server.check_alive()
    requests = max(float(result["total_requests"]), 1.0)
    return Measure(
        throughput=float(result["throughput_rps"]),
        user_us=(user_after - user_before) * 1e6 / requests,
        system_us=(system_after - system_before) * 1e6 / requests,
        switches=None if switches.count is None else switches.count / requests,
    )


def _median_or_na(values: list[float | None]) -> str:
    known = [value for value in values if value is not None]
    return f"{statistics.median(known):.2f}" if known else "n/a"


def parse_cases(text: str) -> list[tuple[str, int]]:
    cases = []
    for item in text.split(","):
        workload, _, conns = item.partition(":")
        if workload not in REQUEST_SIZE or not conns.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: want echo:N or blocking:N")
        cases.append((workload, int(conns)))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cost_per_request",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", type=parse_cases, default=parse_cases("echo:1000,blocking:1000"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    loadgen = build_all()["loadgen"]
    for workload, conns in args.cases:
        rows: dict[str, list[Measure]] = {variant.label: [] for variant in VARIANTS}
        for round_number in range(args.rounds):
            # Rotate the order, so no server always runs first or last in a round.
            shift = round_number % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                rows[variant.label].append(measure(variant, workload, conns, loadgen))
        print(f"\n{workload}, {conns} connections, {args.rounds} rounds (medians)")
        print(
            "| server | req/s | user µs/req | system µs/req | switches/req"
            " | CPU vs threads-bare (range) |"
        )
        print("|---|---|---|---|---|---|")
        bare = rows["threads-bare"]
        for label, measures in rows.items():
            ratios = [
                (m.user_us + m.system_us) / (b.user_us + b.system_us)
                for m, b in zip(measures, bare, strict=True)
            ]
            print(
                f"| {label} | {statistics.median(m.throughput for m in measures) / 1000:.1f}k"
                f" | {statistics.median(m.user_us for m in measures):.2f}"
                f" | {statistics.median(m.system_us for m in measures):.2f}"
                f" | {_median_or_na([m.switches for m in measures])}"
                f" | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
