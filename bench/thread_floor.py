"""What Python threads alone cost on this machine: the floor under the idle and stop workloads.

    .venv/bin/python -m bench.thread_floor              10,000 threads, 3 repeats
    .venv/bin/python -m bench.thread_floor --threads 1000 --repeats 5

A thread-per-connection server must start one thread per connection and, to
stop, wake each one and let it end. This measures exactly that with no
sockets at all, on one core (as the server is pinned in the benchmarks):

- start: ``Thread.start()`` for every thread; each then blocks on its own
  lock, as a connection thread blocks waiting for input.
- wake: wake every thread once, a wave at a time (as threadserve's stop
  wakes connections in waves), and wait until each has blocked again.
- end: wake every thread once more, a wave at a time, and join it.

No server can accept N connections faster than it can start N threads, nor
stop them faster than it can wake and end N threads; the gap between these
figures and threadserve's is what the server itself adds. ``python -m bench`` runs this
too, with as many threads as its largest idle or stop case, and reports it
next to those workloads. Standalone, results go to
``bench/results/thread_floor.json`` (``--out``) and print as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from threading import Lock

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "thread_floor.json"


@dataclass
class Floor:
    start: float
    wake: float
    end: float


def measure(threads: int, wave: int) -> Floor:
    """Seconds to start ``threads`` blocked threads, wake each once, then end them."""
    wake_gates = [_locked() for _ in range(threads)]
    woken = [_locked() for _ in range(threads)]
    end_gates = [_locked() for _ in range(threads)]

    def connection_like(wake_gate: Lock, woke: Lock, end_gate: Lock) -> None:
        wake_gate.acquire()
        woke.release()
        end_gate.acquire()

    workers = [
        threading.Thread(target=connection_like, args=gates, daemon=True)
        for gates in zip(wake_gates, woken, end_gates, strict=True)
    ]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    started = time.perf_counter()
    _in_waves(wake_gates, [woke.acquire for woke in woken], wave)
    all_woken = time.perf_counter()
    _in_waves(end_gates, [worker.join for worker in workers], wave)
    ended = time.perf_counter()
    return Floor(started - began, all_woken - started, ended - all_woken)


def _in_waves(gates: list[Lock], waits: list[Callable[[], object]], wave: int) -> None:
    """Open ``wave`` gates, then wait for each of those threads; repeat until all are done."""
    for first in range(0, len(gates), wave):
        for gate in gates[first : first + wave]:
            gate.release()
        for wait in waits[first : first + wave]:
            wait()


def _locked() -> Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--waves", default="1,128", help="comma list of wave sizes")
    parser.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: no pinning)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    rows = []
    for wave in (int(value) for value in args.waves.split(",")):
        floors = [measure(args.threads, wave) for _ in range(args.repeats)]
        row: dict[str, object] = {"threads": args.threads, "wave": wave}
        for phase in ("start", "wake", "end"):
            seconds = [getattr(floor, phase) for floor in floors]
            row[f"{phase}_seconds"] = seconds
            row[f"{phase}_median"] = statistics.median(seconds)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    environment = {"python": sys.version.split()[0], "pinned_cpu": args.cpu}
    args.out.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")
    print(markdown_table(rows))
    return 0


def markdown_table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| threads | wave | start all | wake each once | wake and end each |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        n = int(str(row["threads"]))
        cells = []
        for phase in ("start", "wake", "end"):
            seconds = float(str(row[f"{phase}_median"]))
            cells.append(f"{seconds:.2f} s ({seconds / n * 1e6:.0f} µs each)")
        lines.append(f"| {n:,} | {row['wave']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
