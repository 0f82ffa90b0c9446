"""`python -m bench`: build, run every peer on every workload, write results.

    python -m bench                    full run, 3 repeats (about 35 minutes),
                                       into bench/results/
    python -m bench --quick            smoke run (about 10 minutes), into
                                       bench/scratch/ (never over the results)
    python -m bench --peers threadserve,threads-bare,asyncio-protocol
                    --workloads short --repeats 1
                                       one workload, three peers
    python -m bench --report-only      redraw tables and charts from results.json

Each run starts a fresh server, warms it with a throwaway run of the same load
(--throwaway seconds), then measures it (--warmup + --duration seconds) and
checks that the throughput was steady across the window's slices (1 s each).
Runs are interleaved: for each repeat, each case is run against every peer in
turn (the order rotates between repeats), so a drift in the machine's speed
hits all peers alike and ratios are taken between runs made minutes apart.

After the runs: the cold-start experiment (why a fresh asyncio server is slow,
bench/coldstart.py), the cross-check of one cell with wrk
(bench/crosscheck.py) and the thread floor (bench/thread_floor.py); skip them
with --skip. RESULTS.md opens with the goals of issue 7, each with its ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench import coldstart, crosscheck, report
from bench.build import BENCH_DIR, BuildError, build_all
from bench.environment import collect
from bench.peerlist import PEERS, Peer
from bench.server import REPO_ROOT, SCRUBBED_ENV
from bench.workloads import WORKLOADS, Case, Settings, plan, run_case

DEFAULT_OUT = BENCH_DIR / "results"
# Quick runs and experiments go here (git-ignored), never over the results.
SCRATCH_OUT = BENCH_DIR / "scratch"
EXTRAS = ("coldstart", "crosscheck", "floor")


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _ints(value: str) -> list[int]:
    return [int(item) for item in _csv(value)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run of every workload")
    parser.add_argument(
        "--peers", type=_csv, default=list(PEERS), help=f"comma list from: {','.join(PEERS)}"
    )
    parser.add_argument(
        "--workloads",
        type=_csv,
        default=list(WORKLOADS),
        help=f"comma list from: {','.join(WORKLOADS)}",
    )
    parser.add_argument("--repeats", type=int, help="runs of each case (default 3, quick 1)")
    parser.add_argument("--conns", type=_ints, help="echo connection counts, e.g. 10,100")
    parser.add_argument("--sizes", type=_ints, help="echo message sizes in bytes, e.g. 64,1024")
    parser.add_argument("--duration", type=float, help="measured seconds per run (3, quick 1.5)")
    parser.add_argument(
        "--warmup", type=float, help="unmeasured seconds within the measured run (0.5, quick 0.3)"
    )
    parser.add_argument(
        "--throwaway",
        type=float,
        help="seconds of the unmeasured run against each fresh server before the measured "
        "one (1.5, quick 1; 0 measures cold servers)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"results directory (default {DEFAULT_OUT.relative_to(BENCH_DIR.parent)}/, "
        f"with --quick {SCRATCH_OUT.relative_to(BENCH_DIR.parent)}/)",
    )
    parser.add_argument(
        "--skip",
        type=_csv,
        default=[],
        help=f"steps after the runs to leave out, comma list from: {','.join(EXTRAS)}",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and client")
    parser.add_argument(
        "--report-only", action="store_true", help="only redraw the report from results.json"
    )
    args = parser.parse_args(argv)
    for name in args.peers:
        if name not in PEERS:
            parser.error(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    for name in args.workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    for name in args.skip:
        if name not in EXTRAS:
            parser.error(f"unknown step {name!r}; known: {', '.join(EXTRAS)}")
    if args.out is None:
        args.out = SCRATCH_OUT if args.quick else DEFAULT_OUT
    return args


def raise_nofile_limit() -> None:
    # Children inherit it: the load generator and every server need up to
    # 10,000 descriptors each, and some servers (threadserve's CLI) are not
    # ours to patch.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pinning(no_pin: bool) -> tuple[int | None, int | None]:
    """(server cpu, client cpu): two distinct cores, or no pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if no_pin or len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def schedule(cases: list[Case], peers: list[Peer], repeats: int) -> list[tuple[int, Case, Peer]]:
    runs: list[tuple[int, Case, Peer]] = []
    for repeat in range(repeats):
        for case in cases:
            shift = repeat % len(peers)
            for peer in peers[shift:] + peers[:shift]:
                if case.workload in peer.workloads and case.runs_on(peer.name):
                    runs.append((repeat, case, peer))
    return runs


def thread_floor(out: Path, threads: int, repeats: int, cpu: int | None) -> Any:
    """Python threads alone, on the server's core (bench/thread_floor.py), in a fresh process."""
    path = out / "thread_floor.json"
    argv = [sys.executable, "-m", "bench.thread_floor", "--threads", str(threads)]
    argv += ["--repeats", str(repeats), "--cpu", str(-1 if cpu is None else cpu)]
    subprocess.run([*argv, "--out", str(path)], check=True, stdout=subprocess.DEVNULL, timeout=600)
    return json.loads(path.read_text())


def run_extras(
    args: argparse.Namespace, settings: Settings, cases: list[Case], repeats: int, out: Path
) -> dict[str, Any]:
    """The steps after the runs; each failure is recorded, not raised."""
    extras: dict[str, Any] = {}
    server_cpu, client_cpu = settings.server_cpu, settings.client_cpu
    steps: list[tuple[str, Any]] = [
        (
            "coldstart",
            lambda: coldstart.experiment(1.0 if args.quick else 2.0, server_cpu, client_cpu),
        ),
        (
            "crosscheck",
            lambda: crosscheck.crosscheck(
                repeats, settings.duration, settings.throwaway, server_cpu, client_cpu
            ),
        ),
    ]
    floor_threads = max((c.conns for c in cases if c.workload in ("idle", "stop")), default=0)
    if floor_threads:
        steps.append(("floor", lambda: thread_floor(out, floor_threads, repeats, server_cpu)))
    for name, step in steps:
        if name in args.skip:
            continue
        if name == "crosscheck" and crosscheck.wrk_available() is not None:
            extras[name] = {"error": crosscheck.wrk_available()}
            continue
        print(f"bench: {name}", file=sys.stderr)
        try:
            extras[name] = step()
        except Exception as exc:  # recorded in the results; the run goes on
            extras[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return extras


def save(path: Path, results: dict[str, Any]) -> None:
    # Write then rename, so an interrupted run never leaves a torn file.
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    if args.report_only:
        report.write_all(json.loads(results_path.read_text()), out)
        print(f"report rewritten in {out}")
        return 0

    raise_nofile_limit()
    try:
        binaries = build_all()
    except BuildError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1

    quick: bool = args.quick
    repeats = args.repeats or (1 if quick else 3)
    server_cpu, client_cpu = pinning(args.no_pin)
    settings = Settings(
        binaries=binaries,
        throwaway=args.throwaway if args.throwaway is not None else (1.0 if quick else 1.5),
        warmup=args.warmup if args.warmup is not None else (0.3 if quick else 0.5),
        duration=args.duration if args.duration is not None else (1.5 if quick else 3.0),
        connect_timeout=10.0 if quick else 60.0,
        settle=0.3 if quick else 1.0,
        stop_timeout=20.0 if quick else 30.0,
        observe_timeout=15.0 if quick else 30.0,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
    )

    peers: list[Peer] = []
    skipped: dict[str, str] = {}
    for name in args.peers:
        reason = PEERS[name].available()
        if reason is None:
            peers.append(PEERS[name])
        else:
            skipped[name] = reason
            print(f"bench: skipping {name}: {reason}", file=sys.stderr)
    if not peers:
        print("bench: no peer can run", file=sys.stderr)
        return 1

    load = os.getloadavg()[0]
    # Before any server of ours runs, the load average is other work.
    if load > 2.0:
        print(
            f"bench: warning: load average is {load:.1f}; other work will skew the numbers",
            file=sys.stderr,
        )
    cases = plan(args.workloads, quick, args.conns, args.sizes)
    runs = schedule(cases, peers, repeats)
    results: dict[str, Any] = {
        "environment": collect(REPO_ROOT),
        "config": {
            "quick": quick,
            "repeats": repeats,
            "peers": [peer.name for peer in peers],
            "peer_notes": {peer.name: peer.note for peer in peers},
            "skipped_peers": skipped,
            "workloads": args.workloads,
            "throwaway": settings.throwaway,
            "warmup": settings.warmup,
            "duration": settings.duration,
            "connect_timeout": settings.connect_timeout,
            "stop_timeout": settings.stop_timeout,
            "server_cpu": server_cpu,
            "client_cpu": client_cpu,
            "seed_print": "kept (the article's print on every message), stdout to /dev/null",
            "server_env_removed": [key for key in SCRUBBED_ENV if key in os.environ],
        },
        "runs": [],
    }
    interrupted = False
    started = time.monotonic()
    try:
        with tqdm(runs, unit="run", dynamic_ncols=True) as progress:
            for repeat, case, peer in progress:
                progress.set_description(f"r{repeat + 1} {case.label} {peer.name}")
                record = run_case(case, peer, settings, repeat)
                results["runs"].append(record)
                if not record["ok"]:
                    progress.write(f"  {peer.name} {case.label}: {record['error']}")
                save(results_path, results)
        results["extras"] = run_extras(args, settings, cases, repeats, out)
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench: interrupted; writing what was measured", file=sys.stderr)
    results["config"]["wall_seconds"] = round(time.monotonic() - started, 1)
    save(results_path, results)
    report.write_all(results, out)
    print(f"results in {out}: results.json, RESULTS.md, *.png")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
