"""Throughput with ``--workers K``: how serving scales over processes.

    .venv/bin/python -m bench.workers                       # this machine: K = 1, 2
    .venv/bin/python -m bench.workers --workers 1,2,4,8 --server-cpus 0-7 \\
        --client-cpus 8-15 --conns 400 --loadgens 8         # a 16-core machine

The server (the supervisor and its workers) is pinned to ``--server-cpus``
and the load generator (bench/loadgen.c, one thread, closed loop, every
byte checked) to ``--client-cpus``; runs of each K are interleaved and
repeated, and the median and its ratio to K = 1 are printed, with the CPU
the server's processes used (a K that cannot use more CPU cannot go faster)
and the load generators' own CPU (each is one thread: near 100 % each, they
are the bottleneck and the run says nothing about the server; add more with
``--loadgens``).

Scaling shows only where the server has K cores to itself and the load
generator has enough cores of its own to outrun K workers. A 2-core machine
has one core for each: K = 2 then puts two workers on one core, which shows
what a second process costs, not what it gains.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .build import build_all
from .server import process_cpu_seconds, stop_process

READY = re.compile(r"(\d+) workers ready, serving on 127\.0\.0\.1:(\d+)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (1,2)")
    parser.add_argument("--server-cpus", default="0", help="taskset list for the server (0)")
    parser.add_argument("--client-cpus", default="1", help="taskset list for loadgen (1)")
    parser.add_argument("--conns", type=int, default=100, help="busy connections (100)")
    parser.add_argument("--size", type=int, default=64, help="message size in bytes (64)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds (5)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each K (3)")
    parser.add_argument(
        "--loadgens",
        type=int,
        default=1,
        help="load generator processes side by side, the connections split between them (1)",
    )
    return parser.parse_args(argv)


def one_run(binary: Path, workers: int, args: argparse.Namespace) -> dict[str, float]:
    command = [
        "taskset", "-c", args.server_cpus,
        sys.executable, "-m", "threadserve", "serve",
        "--bind", "127.0.0.1:0", "--workers", str(workers), "--log-level", "info",
    ]  # fmt: skip
    server = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert server.stderr is not None
        port = 0
        deadline = time.monotonic() + 60
        while not port and time.monotonic() < deadline:
            line = server.stderr.readline().decode(errors="replace")
            if not line:
                raise RuntimeError(f"server ended before it was ready ({server.wait()})")
            match = READY.search(line)
            if match:
                port = int(match.group(2))
        if not port:
            raise RuntimeError("server not ready in 60 s")
        loadgen = [
            "taskset", "-c", args.client_cpus, str(binary),
            "--mode", "echo", "--port", str(port),
            "--conns", str(max(1, args.conns // args.loadgens)),
            "--size", str(args.size), "--warmup", str(args.warmup),
            "--duration", str(args.duration), "--connect-timeout", "30",
        ]  # fmt: skip
        # The supervisor and its workers: the server is all of them.
        cpu_before = process_cpu_seconds(server.pid, include_children=True)
        began = time.monotonic()
        # One thread each: several, side by side, when one cannot keep K workers busy.
        clients = [
            subprocess.Popen(loadgen, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            for _ in range(args.loadgens)
        ]
        results = []
        for client in clients:
            out, _err = client.communicate(timeout=args.warmup + args.duration + 120)
            if client.returncode != 0:
                raise RuntimeError(f"load generator exited {client.returncode}")
            results.append(json.loads([x for x in out.splitlines() if x.strip()][-1]))
        wall = time.monotonic() - began
        cpu = (process_cpu_seconds(server.pid, include_children=True) - cpu_before) / wall
        return {
            "rps": sum(float(r["throughput_rps"]) for r in results),
            "server_cpu": cpu,
            "client_cpu": sum(float(r["client_cpu"] or 0.0) for r in results),
            "errors": float(sum(sum(r["errors"].values()) for r in results)),
        }
    finally:
        stop_process(server, 60)
        if server.stderr is not None:
            server.stderr.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(x) for x in args.workers.split(",")]
    binary = build_all()["loadgen"]
    runs: dict[int, list[dict[str, float]]] = {k: [] for k in counts}
    for repeat in range(args.repeats):
        for k in counts:
            result = one_run(binary, k, args)
            runs[k].append(result)
            print(
                f"repeat {repeat + 1} --workers {k}: {result['rps']:,.0f} req/s, server CPU "
                f"{result['server_cpu']:.2f} cores, loadgen CPU {result['client_cpu']:.0%}, "
                f"errors {result['errors']:.0f}",
                flush=True,
            )
    load = os.getloadavg()[0]
    print(
        f"\necho {args.size} B x{args.conns}, server on CPUs {args.server_cpus}, "
        f"{args.loadgens} loadgen on {args.client_cpus}, {args.repeats} repeats "
        f"(load average now {load:.1f})"
    )
    print("| --workers | req/s (median) | vs 1 | server CPU (cores) | loadgen CPU |")
    print("|---|---|---|---|---|")
    base = statistics.median(r["rps"] for r in runs[counts[0]])
    for k in counts:
        rps = statistics.median(r["rps"] for r in runs[k])
        cpu = statistics.median(r["server_cpu"] for r in runs[k])
        client = statistics.median(r["client_cpu"] for r in runs[k])
        print(f"| {k} | {rps:,.0f} | {rps / base:.2f}x | {cpu:.2f} | {client:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
