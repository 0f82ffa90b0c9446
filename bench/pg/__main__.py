"""Run the PostgreSQL workload: ``python -m bench.pg [--quick]``; results in bench/pg/RESULTS.md.

A throwaway PostgreSQL cluster (Unix socket only, 600 connections allowed) is
created in a temporary folder with an indexed ``items`` table. Every peer
answers the same line protocol from it; the C load generator (lineload.c)
keeps one request in flight per connection and checks every reply:

* lookup: ``GET <id>``, one primary-key lookup, random ids;
* sleep: ``SLOW 0.01``, a 10 ms ``pg_sleep`` standing for a slow query.

The peer runs pinned to CPU 0; the load generator and PostgreSQL share
CPU 1, so the Python server has a core of its own, as in bench/. Each run
starts the peer afresh, fills its pool, warms it up, then measures. Runs are
interleaved (repeat, connections, peer) and the medians reported.

Then the stop: each peer with a client whose ``SLOW 30`` is running, SIGTERM,
and what happened: the time to exit, what the client got, and whether the
query was still running in PostgreSQL once the peer had gone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.server import free_port, process_cpu_seconds, stop_process

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]
import pg_cluster  # noqa: E402
import pg_gateway  # noqa: E402

ROWS = 100_000
SERVER_CPU, LOAD_CPU = 0, 1
SLEEP = "0.01"
PYTHON = sys.executable


@dataclass(frozen=True)
class Peer:
    key: str
    title: str

    def command(self, port: int, dsn: str, conns: int) -> list[str]:
        name = f"bench {self.key}"
        if self.key == "threadserve":
            return [
                PYTHON,
                str(ROOT / "examples" / "pg_gateway.py"),
                *("--bind", f"127.0.0.1:{port}", "--dsn", dsn, "--log-level", "warning"),
                *("--max-connections", str(conns), "--pool-min", str(conns)),
                *("--application-name", name),
            ]
        module, size = {
            "threads": ("peer_threads", ["--pool", str(conns)]),
            "to_thread": ("peer_to_thread", ["--workers", "0"]),
            "to_thread_sized": ("peer_to_thread", ["--workers", str(conns)]),
            "asyncpg": ("peer_asyncpg", ["--pool", str(conns)]),
        }[self.key]
        return [
            PYTHON,
            *("-m", f"bench.pg.{module}", "--port", str(port), "--dsn", dsn, "--name", name),
            *size,
        ]


PEERS = [
    Peer("threadserve", "threadserve + psycopg"),
    Peer("to_thread", "asyncio + to_thread, default pool (6)"),
    Peer("to_thread_sized", "asyncio + to_thread, pool = connections"),
    Peer("asyncpg", "asyncio + asyncpg"),
    Peer("threads", "bare threads + psycopg (seed loop)"),
]


def build_lineload() -> Path:
    target = HERE / "build" / "lineload"
    source = HERE / "lineload.c"
    if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
        target.parent.mkdir(exist_ok=True)
        cc = shutil.which("gcc") or shutil.which("cc") or "cc"
        flags = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"]
        subprocess.run([cc, *flags, "-o", str(target), str(source)], check=True, timeout=120)
    return target


def pin_cluster(cluster: pg_cluster.Cluster) -> None:
    """PostgreSQL on the load generator's core; backends forked later inherit it."""
    pid = int((cluster.folder / "data" / "postmaster.pid").read_text().split()[0])
    postmaster = psutil.Process(pid)
    for process in [postmaster, *postmaster.children()]:
        with contextlib.suppress(psutil.Error):
            process.cpu_affinity([LOAD_CPU])


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    """Until a GET is answered: the peer's pool is filled and it serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"peer exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
                sock.sendall(b"GET 1\n")
                if sock.recv(4096).startswith(b'{"id":1,'):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("peer not ready in time")


@contextlib.contextmanager
def running_peer(peer: Peer, dsn: str, conns: int) -> Iterator[tuple[int, psutil.Process]]:
    port = free_port()
    process = subprocess.Popen(
        ["taskset", "-c", str(SERVER_CPU), *peer.command(port, dsn, conns)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(port, process)
        yield port, psutil.Process(process.pid)
    finally:
        stop_process(process)


def load(
    lineload: Path, port: int, conns: int, mode: str, warmup: float, duration: float
) -> dict[str, Any]:
    command = [
        *("taskset", "-c", str(LOAD_CPU), str(lineload), "--port", str(port)),
        *("--conns", str(conns), "--mode", mode, "--rows", str(ROWS), "--sleep", SLEEP),
        *("--warmup", str(warmup), "--duration", str(duration)),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=warmup + duration + 120)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def measure(args: argparse.Namespace, dsn: str, lineload: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for conns in args.conns:
            for peer in PEERS:
                with running_peer(peer, dsn, conns) as (port, process):
                    for mode in ("lookup", "sleep"):
                        before = process_cpu_seconds(process.pid)
                        started = time.monotonic()
                        result = load(lineload, port, conns, mode, args.warmup, args.duration)
                        spent = process_cpu_seconds(process.pid) - before
                        result.update(
                            peer=peer.key,
                            repeat=repeat,
                            server_cpu=spent / (time.monotonic() - started),
                        )
                        results.append(result)
                        print(
                            f"repeat {repeat} {conns:>4} conns {peer.key:<16} {mode:<6} "
                            f"{result['rps']:>9.0f}/s p99 {result['p99_ms']:8.1f} ms "
                            f"server cpu {result['server_cpu']:.0%} errors {result['errors']}",
                            flush=True,
                        )
    return results


def sleeping(dsn: str, name: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as pg:
        rows = pg.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'",
            (name,),
        ).fetchall()
    return [int(row[0]) for row in rows]


def stop_with_query_in_flight(peer: Peer, dsn: str) -> dict[str, Any]:
    """SIGTERM while a client's 30 s query runs: time to exit, what the client got."""
    name = f"bench {peer.key}"
    with running_peer(peer, dsn, 10) as (port, process):
        with socket.create_connection(("127.0.0.1", port), timeout=40) as client:
            client.sendall(b"SLOW 30\n")
            deadline = time.monotonic() + 30
            while not sleeping(dsn, name) and time.monotonic() < deadline:
                time.sleep(0.05)
            sent = time.monotonic()
            os.kill(process.pid, signal.SIGTERM)
            got = bytearray()
            end = "EOF"
            try:
                while chunk := client.recv(4096):
                    got += chunk
            except ConnectionResetError:
                end = "reset"
            except TimeoutError:
                end = "no end in 40 s"
            client.close()  # At once, as a client does at EOF: ends a lingering close.
            with contextlib.suppress(psutil.Error):
                process.wait(40)
            exited = time.monotonic() - sent
        left_running = bool(sleeping(dsn, name))
    # Leave no query behind for the next peer.
    with psycopg.connect(dsn, autocommit=True) as pg:
        pg.execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (name,),
        )
    return {
        "peer": peer.key,
        "exit_s": exited,
        "client_got": got.decode(errors="replace"),
        "client_end": end,
        "query_left_running": left_running,
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _machine_note(data: dict[str, Any]) -> str:
    """Whether other work shared the machine, judged by the load average before the run."""
    before = float(str(data["load_before"]).split(" / ")[0])
    if before < (os.cpu_count() or 1):
        return (
            f"The machine ran nothing else: load average {data['load_before']} before the "
            f"run, {data['load_after']} after it (the run's own load: the peer, PostgreSQL "
            "and the load generator)."
        )
    return (
        f"**The machine was busy**: other work ran on both cores during the run (load "
        f"average {data['load_before']} before, {data['load_after']} after). Absolute figures "
        "are low and noisy: the server CPU column shows that no peer had its core to itself, "
        "so differences under about 2x within a row are not to be trusted."
    )


def write_report(path: Path, data: dict[str, Any]) -> None:
    results: list[dict[str, Any]] = data["results"]
    lines = [
        "# PostgreSQL workload: threadserve against its peers",
        "",
        f"Run: `{data['command']}` on {data['when']}. "
        f"{data['repeats']} repeats, medians; {data['warmup']} s warm-up then "
        f"{data['duration']} s measured per run; {ROWS:,} rows in `items`.",
        "",
        "Setup: the peer pinned to CPU 0; the load generator (bench/pg/lineload.c, one request "
        "in flight per connection, every reply checked) and PostgreSQL "
        f"{data['postgres']} pinned to CPU 1, through a Unix socket. Every pool holds as many "
        "database connections as there are clients, opened before the run, except the "
        "default `to_thread` one (one per executor thread: 6 here).",
        "",
        _machine_note(data),
        "",
    ]
    for mode, heading, ideal_note in [
        ("lookup", "One indexed lookup per request (`GET <id>`)", ""),
        (
            "sleep",
            "A 10 ms slow query per request (`SLOW 0.01`: `pg_sleep(0.01)`)",
            " Ideal: connections / 10 ms (1,000/s at 10, 10,000/s at 100, 50,000/s at 500).",
        ),
    ]:
        lines += [
            f"## {heading}",
            "",
            f"Requests per second, and p99 latency (ms) in brackets.{ideal_note} "
            "Server CPU: the peer's own CPU time over the run (100% = its core is full).",
            "",
            "| connections | " + " | ".join(p.title for p in PEERS) + " |",
            "|---|" + "---|" * len(PEERS),
        ]
        for conns in data["conns"]:
            cells = []
            for peer in PEERS:
                runs = [
                    r
                    for r in results
                    if r["peer"] == peer.key and r["mode"] == mode and r["conns"] == conns
                ]
                # A run where some connection got no first reply within the
                # load generator's 30 s was not measured: left out, and marked.
                measured = [r for r in runs if r["duration"] > 0]
                rps = median([r["rps"] for r in measured])
                p99 = median([r["p99_ms"] for r in measured])
                cpu = median([r["server_cpu"] for r in measured])
                errors = sum(r["errors"] + r["lost"] for r in measured)
                flag = f", {errors} errors" if errors else ""
                flag += " §" * (len(measured) < len(runs))
                cells.append(f"{rps:,.0f} ({p99:,.1f} ms; cpu {cpu:.0%}{flag})")
            lines.append(f"| {conns} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(" §" in line for line in lines):
        lines += [
            "§ one of the runs is left out of the median: some of its connections had no "
            "first reply within the load generator's 30 s (a symptom of the overloaded "
            "machine; no request failed).",
            "",
        ]
    lines += [
        "## SIGTERM with a 30 s query in flight",
        "",
        "One client has sent `SLOW 30`; once PostgreSQL shows the query running, the peer "
        "gets SIGTERM.",
        "",
        "| peer | SIGTERM to exit | the client got | then | query still running "
        "in PostgreSQL after the exit |",
        "|---|---|---|---|---|",
    ]
    titles = {p.key: p.title for p in PEERS}
    for stop in data["stops"]:
        got = stop["client_got"].strip().replace("\n", " / ") or "nothing"
        lines.append(
            f"| {titles[stop['peer']]} | {stop['exit_s']:.2f} s | {got} | {stop['client_end']} "
            f"| {'yes' if stop['query_left_running'] else 'no'} |"
        )
    lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, short runs")
    parser.add_argument("--conns", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md from RESULTS.json"
    )
    args = parser.parse_args()
    if args.report_only:
        write_report(args.out, json.loads(args.out.with_suffix(".json").read_text()))
        return
    if args.quick:
        args.repeats, args.warmup, args.duration = 1, 0.5, 1.0
        args.out = ROOT / "bench" / "scratch" / "pg-RESULTS.md"
        args.out.parent.mkdir(exist_ok=True)
    lineload = build_lineload()
    load_before = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    with pg_cluster.throwaway_cluster(max_connections=600, shared_buffers="'256MB'") as cluster:
        pin_cluster(cluster)
        pg_gateway.create_demo_table(cluster.dsn, ROWS)
        with psycopg.connect(cluster.dsn) as pg:
            version = pg.execute("SHOW server_version").fetchone()
        results = measure(args, cluster.dsn, lineload)
        stops = [stop_with_query_in_flight(peer, cluster.dsn) for peer in PEERS]
    data = {
        "command": "python -m bench.pg" + (" --quick" if args.quick else ""),
        "when": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "duration": args.duration,
        "conns": args.conns,
        "postgres": version[0] if version else "?",
        "load_before": load_before,
        "load_after": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "results": results,
        "stops": stops,
    }
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    write_report(args.out, data)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
