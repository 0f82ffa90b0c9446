"""Why a fresh asyncio server is slow: glibc malloc's dynamic mmap threshold.

    python -m bench.coldstart [--duration 2] [--out bench/scratch/coldstart.json]

asyncio's selector transport reads with `sock.recv(256 * 1024)`: every read
allocates a 256 KiB bytes object, then shrinks it to the bytes received.
glibc serves a request at or above M_MMAP_THRESHOLD (128 KiB at start) with
a fresh `mmap`, so each read maps, faults in and unmaps memory. glibc raises
the threshold (and the trim threshold with it) the first time a program frees
an mmapped block larger than the threshold; from then on the buffers come
from the heap and are reused. In an echo server that first happens when a
client leaves: `recv` returns b'' and the unshrunk 256 KiB buffer is freed
whole. Until the first client disconnects, the server runs slow.

The experiment: a fresh server, two back-to-back runs of the same load (100
connections, 1 KiB), each run's throughput and the server's minor page faults
per request, under:

- the default environment;
- the default, after one client has connected, echoed and closed;
- MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set, alone and together
  (setting either turns the dynamic adjustment off; with only one raised, the
  other still makes every read map or trim memory);
- threadserve, fresh (it reads into 64 KiB, below the threshold).

Run by `python -m bench` after the main runs and rendered in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.build import build_all
from bench.client import run_echo
from bench.peerlist import PEERS
from bench.server import ServerProcess, free_port

MMAP = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
TRIM = {"MALLOC_TRIM_THRESHOLD_": "67108864"}


@dataclass(frozen=True)
class Variant:
    label: str
    peer: str
    env: dict[str, str] = field(default_factory=dict)
    close_one_first: bool = False  # one connection opened, echoed and closed before run 1


VARIANTS = (
    Variant("asyncio, default", "asyncio-protocol"),
    Variant("asyncio, one client closed first", "asyncio-protocol", close_one_first=True),
    Variant("asyncio, MALLOC_MMAP_THRESHOLD_=1 MiB", "asyncio-protocol", MMAP),
    Variant("asyncio, MALLOC_TRIM_THRESHOLD_=64 MiB", "asyncio-protocol", TRIM),
    Variant("asyncio, both thresholds fixed", "asyncio-protocol", {**MMAP, **TRIM}),
    Variant("threadserve, default", "threadserve"),
)


def run_variant(
    variant: Variant,
    loadgen: Path,
    duration: float,
    server_cpu: int | None,
    client_cpu: int | None,
) -> dict[str, Any]:
    port = free_port()
    argv = PEERS[variant.peer].command(port, "echo")
    runs: list[dict[str, Any]] = []
    with ServerProcess(argv, port, server_cpu, env=variant.env) as server:
        server.wait_listening(timeout=30)
        if variant.close_one_first:
            run_echo(
                loadgen, port=port, conns=0, size=64, short=1, warmup=0, duration=0.05,
                connect_timeout=10, server_pid=server.pid, cpu=client_cpu,
            )  # fmt: skip
        for _ in range(2):
            faults = server.minor_faults()
            client = run_echo(
                loadgen, port=port, conns=100, size=1024, warmup=0, duration=duration,
                connect_timeout=10, server_pid=server.pid, cpu=client_cpu,
            )  # fmt: skip
            requests = max(int(client["total_requests"]), 1)
            runs.append(
                {
                    "throughput_rps": client["throughput_rps"],
                    "faults_per_request": (server.minor_faults() - faults) / requests,
                    "slices": client["slices"]["requests"],
                }
            )
        server.check_alive()
    return {"label": variant.label, "peer": variant.peer, "env": variant.env, "runs": runs}


def experiment(duration: float, server_cpu: int | None, client_cpu: int | None) -> dict[str, Any]:
    loadgen = build_all()["loadgen"]
    rows = [run_variant(v, loadgen, duration, server_cpu, client_cpu) for v in VARIANTS]
    return {"duration": duration, "conns": 100, "size": 1024, "rows": rows}


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        "| server | run 1 req/s | run 1 faults/req | run 2 req/s | run 2 faults/req |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cells = [row["label"]]
        for run in row["runs"]:
            cells += [f"{run['throughput_rps'] / 1000:.1f}k", f"{run['faults_per_request']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.coldstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per run")
    parser.add_argument("--server-cpu", type=int, default=0, help="-1: do not pin")
    parser.add_argument("--client-cpu", type=int, default=1, help="-1: do not pin")
    parser.add_argument("--out", type=Path, help="write the JSON here as well")
    args = parser.parse_args(argv)
    pin = [None if cpu < 0 else cpu for cpu in (args.server_cpu, args.client_cpu)]
    result = experiment(args.duration, pin[0], pin[1])
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
