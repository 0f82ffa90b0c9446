"""redis-benchmark against examples/kv.py, its asyncio twins and redis-server, in one run.

    python -m bench.kv.run [--repeats 3] [--requests 20000] [--clients 50]

Every server is started on a free loopback port, pinned to core 0; redis-benchmark
runs pinned to core 1 (``taskset``). Each server is warmed up first (a fresh
CPython server runs slower for its first seconds). Then, ``--repeats`` times,
each server in turn gets the same four runs: SET and GET (one redis-benchmark
call runs both), plain and with ``-P 16``, same ``-c``, ``-n`` and ``-r``.
The medians go to bench/kv/RESULTS.md, every figure to bench/kv/results.json.

The peers:

* ``threadserve``: examples/kv.py, a thread and a ``sqlite3`` connection per client;
* ``asyncio + to_thread``: bench/kv/asyncio_kv.py, SQLite on the default executor;
* ``asyncio, SQLite in the loop``: the same, calling SQLite on the loop's thread;
* ``redis-server``: the C reference, with its append-only file on and
  ``appendfsync no``, the same durability as the SQLite servers'
  ``synchronous=NORMAL`` (each write reaches the OS before its reply: it
  survives the process, not a power loss).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.server import free_port, process_cpu_seconds

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SERVER_CPU, CLIENT_CPU = "0", "1"
TESTS = ("SET", "GET")
PIPELINES = (1, 16)


@dataclass(frozen=True)
class Peer:
    name: str
    command: tuple[str, ...]  # {port} and {dir} are filled in.


PEERS = (
    Peer(
        "threadserve",
        (
            *(sys.executable, str(ROOT / "examples" / "kv.py"), "--bind", "127.0.0.1:{port}"),
            *("--db", "{dir}/threadserve.sqlite3", "--log-level", "warning"),
        ),
    ),
    Peer(
        "asyncio + to_thread",
        (
            *(sys.executable, "-m", "bench.kv.asyncio_kv", "--bind", "127.0.0.1:{port}"),
            *("--db", "{dir}/to_thread.sqlite3", "--sqlite-in", "thread"),
        ),
    ),
    Peer(
        "asyncio, SQLite in the loop",
        (
            *(sys.executable, "-m", "bench.kv.asyncio_kv", "--bind", "127.0.0.1:{port}"),
            *("--db", "{dir}/in_loop.sqlite3", "--sqlite-in", "loop"),
        ),
    ),
    Peer(
        "redis-server",
        (
            *("redis-server", "--port", "{port}", "--bind", "127.0.0.1", "--dir", "{dir}"),
            *("--save", "", "--appendonly", "yes", "--appendfsync", "no", "--daemonize", "no"),
        ),
    ),
)


def check_tools() -> None:
    missing = [
        tool for tool in ("redis-server", "redis-benchmark", "taskset") if not shutil.which(tool)
    ]
    if missing:
        sys.exit(
            f"bench/kv needs {', '.join(missing)}: install the Debian packages with\n"
            "    apt-get install redis-server redis-tools util-linux\n"
            "(redis-server is only needed here, not by the tests)"
        )
    if (os.cpu_count() or 1) < 2:
        sys.exit(
            "bench/kv pins the server and redis-benchmark to two different cores;"
            " this machine has one"
        )


@contextlib.contextmanager
def running(peer: Peer, workdir: Path) -> Iterator[tuple[int, int]]:
    """Start the server pinned to the server core; yield its port and pid once it answers PING."""
    port = free_port()
    command = [part.format(port=port, dir=workdir) for part in peer.command]
    log = (workdir / f"{peer.name.split()[0].strip(',')}.log").open("ab")
    process = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, *command],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{peer.name} exited with {process.returncode}; see {log.name}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), 1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16) == b"+PONG\r\n":
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{peer.name} did not answer PING in 30 s")
            time.sleep(0.05)
        yield port, process.pid  # taskset execs the server: same pid.
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def redis_benchmark(
    server: tuple[int, int], args: argparse.Namespace, test: str, pipeline: int, requests: int
) -> tuple[float, float]:
    """One redis-benchmark run of one test: requests per second, and server CPU µs per request.

    The CPU figure holds up when the machine is busy with other work: a
    server that gets less of its core serves fewer requests per second, but
    each request still costs it about the same CPU time.
    """
    port, pid = server
    command = ["taskset", "-c", CLIENT_CPU, "redis-benchmark", "-h", "127.0.0.1", "-p", str(port)]
    command += ["-c", str(args.clients), "-n", str(requests), "-r", str(args.keyspace)]
    command += ["-P", str(pipeline), "-t", test.lower(), "--csv"]
    cpu_before = process_cpu_seconds(pid)
    done = subprocess.run(command, capture_output=True, timeout=600, check=True)
    cpu_used = process_cpu_seconds(pid) - cpu_before
    output = done.stdout.decode()
    if "error" in (output + done.stderr.decode()).lower():
        raise RuntimeError(f"redis-benchmark reported errors:\n{output}{done.stderr.decode()}")
    rows = [[field.strip('"') for field in line.split(",")] for line in output.splitlines()[1:]]
    if [row[0] for row in rows] != [test]:
        raise RuntimeError(f"unexpected redis-benchmark output:\n{output}")
    return float(rows[0][1]), cpu_used / requests * 1e6


def version(command: Sequence[str]) -> str:
    done = subprocess.run(command, capture_output=True, timeout=30, check=False)
    return done.stdout.decode().strip().splitlines()[0] if done.stdout else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20000, help="redis-benchmark -n")
    parser.add_argument("--clients", type=int, default=50, help="redis-benchmark -c")
    parser.add_argument("--keyspace", type=int, default=100000, help="redis-benchmark -r")
    parser.add_argument("--output", type=Path, default=HERE)
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md from results.json"
    )
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((args.output / "results.json").read_text())
        (args.output / "RESULTS.md").write_text(report(saved["runs"], saved["environment"]))
        return
    check_tools()
    started = time.time()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    # runs[peer][f"{test} -P {pipeline}"] = {"rate": [...], "cpu_us": [...]}, one per repeat
    runs: dict[str, dict[str, dict[str, list[float]]]] = {peer.name: {} for peer in PEERS}
    with tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        servers = {peer.name: stack.enter_context(running(peer, workdir)) for peer in PEERS}
        for peer in PEERS:
            print(f"warming up {peer.name}", flush=True)
            for pipeline in PIPELINES:
                for test in TESTS:
                    redis_benchmark(servers[peer.name], args, test, pipeline, args.requests // 2)
        # Interleaved: each repeat runs every peer once, so a burst of load
        # from elsewhere on the machine does not land on one peer only.
        for repeat in range(args.repeats):
            for peer in PEERS:
                for pipeline in PIPELINES:
                    for test in TESTS:
                        rate, cpu_us = redis_benchmark(
                            servers[peer.name], args, test, pipeline, args.requests
                        )
                        result = runs[peer.name].setdefault(
                            f"{test} -P {pipeline}", {"rate": [], "cpu_us": []}
                        )
                        result["rate"].append(rate)
                        result["cpu_us"].append(cpu_us)
                        print(
                            f"repeat {repeat + 1}: {peer.name}, {test} -P {pipeline}: "
                            f"{rate:.0f} requests/s, {cpu_us:.1f} µs of server CPU each",
                            flush=True,
                        )
    environment = {
        "date": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "duration_s": round(time.time() - started),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        # "Redis server v=7.0.15 sha=... malloc=...": the version is enough.
        "redis_server": version(["redis-server", "--version"]).split(" sha=")[0],
        "redis_benchmark": version(["redis-benchmark", "--version"]),
        "cpus": os.cpu_count(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "clients": args.clients,
        "requests": args.requests,
        "keyspace": args.keyspace,
        "repeats": args.repeats,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(
        json.dumps({"environment": environment, "runs": runs}, indent=2) + "\n"
    )
    (args.output / "RESULTS.md").write_text(report(runs, environment))
    print(report(runs, environment))


def _machine_note(env: dict[str, object]) -> str:
    """Whether other work shared the machine, judged by the load average at the start."""
    start = env.get("load_average_at_start")
    cpus = env.get("cpus")
    if isinstance(start, list) and isinstance(cpus, int) and start[0] < cpus:
        return (
            "The machine ran nothing else (load average below its CPU count at the "
            "start). The min-max spread shows how much the rates still vary from run "
            "to run. Server CPU per request is measured from the server process's own "
            "CPU time (/proc)."
        )
    return (
        "The machine was shared with other work during the run (other test suites "
        "and benchmarks), so requests per second are noisy: a server gets only part "
        "of its core. The min-max spread shows how much. Server CPU per request is "
        "measured from the server process's own CPU time (/proc), and holds up "
        "much better on a busy machine."
    )


def report(runs: dict[str, dict[str, dict[str, list[float]]]], env: dict[str, object]) -> str:
    names = [peer.name for peer in PEERS]
    lines = [
        "# examples/kv.py under redis-benchmark",
        "",
        f"Written by `python -m bench.kv.run` on {env['date']} ({env['duration_s']} s). "
        f"redis-benchmark `-c {env['clients']} -n {env['requests']} -r {env['keyspace']}`, "
        "one run per test (SET, GET), plain and `-P 16`; server pinned to core 0, "
        f"redis-benchmark to core 1; every server warmed up first; {env['repeats']} "
        "interleaved repeats. Median (min-max); in brackets, the ratio to threadserve's median.",
    ]
    tables = [
        ("rate", "requests/s (higher is better)", _k),
        ("cpu_us", "server CPU per request, µs (lower is better)", _us),
    ]
    for metric, title, show in tables:
        lines += ["", f"| {title} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for pipeline in PIPELINES:
            for test in TESTS:
                key = f"{test} -P {pipeline}"
                base = statistics.median(runs[names[0]][key][metric])
                cells = []
                for name in names:
                    values = runs[name][key][metric]
                    median = statistics.median(values)
                    cell = f"{show(median)} ({show(min(values))}-{show(max(values))})"
                    if name != names[0]:
                        cell += f" [{median / base:.2f}x]"
                    cells.append(cell)
                label = test if pipeline == 1 else f"{test}, -P {pipeline}"
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Python {env['python']}, SQLite {env['sqlite']}, {env['redis_server']}; "
        f"{env['cpus']} CPUs; load average at the start "
        f"{env.get('load_average_at_start', '?')}, at the end {env['load_average_at_end']}.",
        "",
        _machine_note(env),
        "",
        "On a contended core, how much CPU each server gets may also depend on how "
        "many runnable threads it has (Linux shares a core between threads, not "
        "processes), which could favour the threaded server; this run does not "
        "measure it. So read the rates with the CPU table, where the per-request "
        "cost of each server shows.",
        "",
        "What the peers are: see the docstring of bench/kv/run.py. All three Python "
        "servers use the same RESP parser, commands and SQLite schema "
        "(examples/resp.py, examples/kv.py); SQLite runs in WAL mode with "
        "`synchronous=NORMAL`, one commit per write, before its reply.",
        "",
    ]
    return "\n".join(lines)


def _us(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _k(rate: float) -> str:
    return f"{rate / 1000:.1f}k"


if __name__ == "__main__":
    main()
