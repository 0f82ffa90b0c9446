"""Turn results.json into RESULTS.md and PNG charts.

Only numbers from the same results file are compared. A ratio between two
peers is taken run by run within one repeat (the two runs were made minutes
apart) and then summarised, rather than dividing two medians.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullFormatter

from bench import coldstart
from bench.thread_floor import markdown_table

Run = dict[str, Any]
CaseKey = tuple[str, int, int, str]  # workload, conns, size, variant

BASELINES = ("threads-bare", "asyncio-protocol", "uvloop")
# Above this share of the machine's CPU used by other processes during the
# runs, the results are flagged as noisy.
BUSY_SHARE = 0.10
PEER_ORDER = (
    "threadserve",
    "threads-bare",
    "seed",
    "socketserver",
    "asyncio-protocol",
    "asyncio-pool",
    "asyncio-streams",
    "uvloop",
    "gevent",
    "trio",
    "c-epoll",
)
CLIENT_BOUND_MARK = "\u2021"  # double dagger
STARVED_MARK = "\u00a7"  # section sign
FAILED_MARK = "\u2717"  # ballot x
UNSTEADY_MARK = "~"
# A run whose 1-second slices stray further than this from their mean was
# not in a steady state (or the machine was disturbed): marked UNSTEADY_MARK.
UNSTEADY_SPREAD = 0.25
# Typographic characters, spelled as escapes so the source stays ASCII.
DASH = "\u2013"  # en dash, for ranges and empty cells
TIMES = "\u00d7"  # multiplication sign, for ratios


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    count: int


def summarize(values: Iterable[float]) -> Summary | None:
    data = sorted(values)
    if not data:
        return None
    return Summary(statistics.median(data), data[0], data[-1], len(data))


def case_key(run: Run) -> CaseKey:
    return (run["workload"], run["conns"], run["size"], run.get("variant", ""))


def group(runs: list[Run]) -> dict[CaseKey, dict[str, list[Run]]]:
    grouped: dict[CaseKey, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[case_key(run)][run["peer"]].append(run)
    return grouped


def ordered_peers(runs: list[Run]) -> list[str]:
    present = {run["peer"] for run in runs}
    known = [peer for peer in PEER_ORDER if peer in present]
    return known + sorted(present - set(known))


def metric_summary(runs: list[Run], metric: str) -> Summary | None:
    return summarize(
        float(run["metrics"][metric])
        for run in runs
        if run["ok"] and run["metrics"].get(metric) is not None
    )


def ratio_summary(mine: list[Run], theirs: list[Run], metric: str) -> Summary | None:
    """Ratios of `metric`, each between two runs of the same repeat."""
    by_repeat = {run["repeat"]: run for run in theirs if run["ok"]}
    ratios = []
    for run in mine:
        other = by_repeat.get(run["repeat"])
        if not run["ok"] or other is None:
            continue
        denominator = float(other["metrics"].get(metric) or 0)
        if denominator > 0:
            ratios.append(float(run["metrics"][metric]) / denominator)
    return summarize(ratios)


# ---- number formatting ----


def fmt_count(value: float) -> str:
    if value >= 100_000:
        return f"{value / 1000:.0f}k"
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def fmt_us(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1e6:.2f} s"
    if value >= 1000:
        return f"{value / 1000:.3g} ms"
    return f"{value:.3g} µs"


def fmt_range(summary: Summary | None, fmt: Callable[[float], str]) -> str:
    if summary is None:
        return DASH
    if summary.count == 1 or summary.low == summary.high:
        return fmt(summary.median)
    return f"{fmt(summary.median)} ({fmt(summary.low)}{DASH}{fmt(summary.high)})"


def fmt_ratio(summary: Summary | None) -> str:
    if summary is None:
        return DASH
    if summary.count == 1:
        return f"{summary.median:.2f}{TIMES}"
    return f"{summary.median:.2f}{TIMES} ({summary.low:.2f}{DASH}{summary.high:.2f})"


def marks(runs: list[Run]) -> str:
    out = ""
    if any(run["ok"] and run["metrics"].get("client_bound") for run in runs):
        out += CLIENT_BOUND_MARK
    if any(run["ok"] and run["metrics"].get("starved") for run in runs):
        out += STARVED_MARK
    if any(
        run["ok"] and (run["metrics"].get("slice_spread") or 0) > UNSTEADY_SPREAD for run in runs
    ):
        out += UNSTEADY_MARK
    failed = sum(1 for run in runs if not run["ok"])
    if failed:
        out += f" {FAILED_MARK}{failed}"
    return out


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


# What a table shows of one peer in one case, from the peer's runs and every
# peer's runs of that case (a ratio needs its baseline's). A list fills
# several columns.
Cell = Callable[[list[Run], dict[str, list[Run]]], str | list[str]]


def peer_rows(
    grouped: dict[CaseKey, dict[str, list[Run]]],
    peers: list[str],
    keys: list[CaseKey],
    cell: Cell,
) -> list[list[str]]:
    """A row per peer, its name then ``cell`` for each case in ``keys``."""
    rows = []
    for peer in peers:
        row = [peer]
        for key in keys:
            value = cell(grouped[key].get(peer, []), grouped[key])
            row += [value] if isinstance(value, str) else value
        rows.append(row)
    return rows


def peers_in(
    grouped: dict[CaseKey, dict[str, list[Run]]], peers: list[str], keys: list[CaseKey]
) -> list[str]:
    """The peers that ran at least one of these cases, in order."""
    return [peer for peer in peers if any(grouped[key].get(peer) for key in keys)]


def rows_over_runs(
    runs: list[Run], peers: list[str], cells: Callable[[list[Run]], list[str]]
) -> list[list[str]]:
    """A row per peer with runs among ``runs`` (every case at once): its name, then ``cells``."""
    rows = []
    for peer in peers:
        mine = [run for run in runs if run["peer"] == peer]
        if mine:
            rows.append([peer, *cells(mine)])
    return rows


def range_cell(metric: str, fmt: Callable[[float], str]) -> Cell:
    """Median (min-max) of ``metric`` with the runs' marks; blank where the peer did not run."""
    return lambda runs, _case: (
        (fmt_range(metric_summary(runs, metric), fmt) if runs else "") + marks(runs)
    )


def ratio_cell(baseline: str, metric: str) -> Cell:
    """The peer's ``metric`` over ``baseline``'s, repeat by repeat, summarised."""
    return lambda runs, case: fmt_ratio(ratio_summary(runs, case.get(baseline, []), metric))


def latency_cell(metrics: tuple[str, ...]) -> Cell:
    """Medians of several latency metrics, ``p50 / p99 / ...``."""

    def cell(runs: list[Run], _case: dict[str, list[Run]]) -> str:
        parts = [metric_summary(runs, m) for m in metrics]
        return " / ".join(fmt_us(p.median) if p else DASH for p in parts)

    return cell


# ---- sections ----


def _load_sections(
    grouped: dict[CaseKey, dict[str, list[Run]]],
    peers: list[str],
    workload: str,
    size: int,
    title: str,
) -> list[str]:
    keys = sorted(k for k in grouped if k[0] == workload and k[2] == size)
    if not keys:
        return []
    conns = [k[1] for k in keys]
    header = ["peer", *[f"{n:,} conns" for n in conns]]
    lines = [f"## {title}", ""]
    peers = peers_in(grouped, peers, keys)

    def rows(cell: Cell) -> list[str]:
        return table(header, peer_rows(grouped, peers, keys, cell))

    lines += [f"Requests per second, median (min{DASH}max) over repeats.", ""]
    lines += rows(range_cell("throughput_rps", fmt_count))

    if workload == "blocking":

        def fraction(runs: list[Run], _case: dict[str, list[Run]]) -> str:
            summary = metric_summary(runs, "fraction_of_ideal")
            return f"{summary.median:.1%}" if summary else DASH

        lines += ["Fraction of the ideal (connections / 10 ms), median.", ""]
        lines += rows(fraction)

    baselines = ("asyncio-pool", *BASELINES) if workload == "blocking" else BASELINES
    for baseline in baselines:
        if not any(baseline in grouped[key] for key in keys):
            continue
        lines += [f"Throughput ratio to {baseline}, same repeat, median (min{DASH}max).", ""]
        lines += rows(ratio_cell(baseline, "throughput_rps"))

    lines += ["Latency p50 / p99 / p99.9, medians over repeats.", ""]
    lines += rows(latency_cell(("p50_us", "p99_us", "p999_us")))
    return lines


def _idle_section(grouped: dict[CaseKey, dict[str, list[Run]]], peers: list[str]) -> list[str]:
    keys = sorted(k for k in grouped if k[0] == "idle")
    if not keys:
        return []
    lines = [
        "## Idle connections",
        "",
        "Growth of the server's RSS and page tables (VmPTE) per connection held, and the",
        "time from the first connect until every connection had done one round trip.",
        "Medians over repeats.",
        "",
    ]
    header = ["peer"]
    for key in keys:
        n = f"{key[1]:,}"
        header += [f"RSS/conn @{n}", f"PTE/conn @{n}", f"threads/conn @{n}", f"accept all @{n}"]

    def cells(runs: list[Run], _case: dict[str, list[Run]]) -> list[str]:
        if not runs:
            return ["", "", "", ""]
        rss = metric_summary(runs, "rss_per_conn_kib")
        pte = metric_summary(runs, "pte_per_conn_kib")
        threads = metric_summary(runs, "threads_per_conn")
        accept = metric_summary(runs, "accept_seconds")
        return [
            (f"{rss.median:.1f} KiB" if rss else DASH) + marks(runs),
            f"{pte.median * 1024:.0f} B" if pte else DASH,
            f"{threads.median:.2f}" if threads else DASH,
            fmt_range(accept, lambda v: f"{v:.2f} s"),
        ]

    return lines + table(header, peer_rows(grouped, peers, keys, cells))


def _stop_section(grouped: dict[CaseKey, dict[str, list[Run]]], peers: list[str]) -> list[str]:
    keys = sorted((k for k in grouped if k[0] == "stop"), key=lambda k: (k[3] != "idle", k[1]))
    if not keys:
        return []
    lines = [
        "## Stop",
        "",
        f"SIGTERM to process exit (median, min{DASH}max), the exit code, and what clients saw",
        "(counts from the last repeat): `notice` = the goodbye text then EOF, `notice+RST`",
        "= the text then a reset, `EOF` = a bare FIN, `RST` = a reset, `open` = nothing",
        "within the observation window. `unanswered`: requests in flight when the connection",
        "ended (a closed-loop client always has one); `partial echoes`: replies cut mid-message.",
        "",
    ]
    header = ["peer", *[f"{k[3]} {k[1]:,}" for k in keys]]
    return lines + table(header, peer_rows(grouped, peers, keys, _stop_cell))


def _stop_cell(runs: list[Run], _case: dict[str, list[Run]]) -> str:
    """The time to exit, the exit code, and what the last repeat's clients saw."""
    if not runs:
        return ""
    exit_time = summarize(
        float(run["metrics"]["exit_seconds"]) for run in runs if "exit_seconds" in run["metrics"]
    )
    last = runs[-1]["metrics"]
    seen = [
        f"{last.get(name, 0)} {label}"
        for name, label in (
            ("notice_eof", "notice"),
            ("notice_reset", "notice+RST"),
            ("eof", "EOF"),
            ("reset", "RST"),
            ("open", "open"),
            ("other", "other"),
        )
        if last.get(name)
    ]
    if last.get("unanswered"):
        seen.append(f"{last['unanswered']} unanswered")
    if last.get("partial_echoes"):
        seen.append(f"{last['partial_echoes']} partial echoes")
    killed = " (killed)" if last.get("killed") else ""
    code = last.get("returncode")
    return (
        f"{fmt_range(exit_time, _fmt_seconds)}, exit {code}{killed}; "
        + ", ".join(seen)
        + marks(runs).replace(CLIENT_BOUND_MARK, "")
    )


def _fmt_seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _floor_section(floor: dict[str, Any] | None) -> list[str]:
    if not floor:
        return []
    return [
        "## Floor: Python threads alone",
        "",
        "No sockets: start N threads that each block on a lock, wake each once, then wake",
        "and end each (waves of 1 and of 128), on the server's core. A thread-per-connection",
        "server cannot accept or stop N connections faster than this (bench/thread_floor.py).",
        "",
        markdown_table(floor["rows"]),
        "",
    ]


def _generator_section(runs: list[Run], peers: list[str]) -> list[str]:
    load = [r for r in runs if r["workload"] in ("echo", "short", "blocking", "mixed") and r["ok"]]
    if not load:
        return []
    lines = [
        "## Load generator check",
        "",
        "CPU use during the measured window, as a fraction of one core, medians over all",
        "load runs (echo, short, blocking, mixed). A run where the generator used 90% or",
        f"more is marked {CLIENT_BOUND_MARK} in the tables: there the generator, not the server,",
        "may be the limit. A server column near 100% for c-epoll shows the generator",
        "saturating the compiled server.",
        "",
    ]

    def cells(mine: list[Run]) -> list[str]:
        server = summarize(float(r["metrics"]["server_cpu"] or 0) for r in mine)
        client = summarize(float(r["metrics"]["client_cpu"] or 0) for r in mine)
        bound = sum(1 for r in mine if r["metrics"].get("client_bound"))
        return [
            f"{server.median:.0%}" if server else DASH,
            f"{client.median:.0%}" if client else DASH,
            f"{bound}/{len(mine)}",
        ]

    header = ["peer", "server CPU", "generator CPU", "client-bound runs"]
    return lines + table(header, rows_over_runs(load, peers, cells))


def _environment_section(results: dict[str, Any]) -> list[str]:
    env = results.get("environment", {})
    config = results.get("config", {})
    limits = env.get("rlimit_nofile", {})
    sysctl = env.get("sysctl", {})
    packages = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v)
    lines = [
        "## Environment and method",
        "",
        f"- {env.get('timestamp')}, git {str(env.get('git_commit'))[:12]}",
        f"- Python {env.get('python')} ({env.get('python_implementation')}), {env.get('kernel')}",
        f"- CPU: {env.get('cpu_model')}, {env.get('cpu_count')} cores; server pinned to "
        f"CPU {config.get('server_cpu')}, generator to CPU {config.get('client_cpu')}",
        f"- open files {limits.get('soft')}/{limits.get('hard')} (raised to the hard limit in "
        f"every process), somaxconn {sysctl.get('somaxconn')}, pid_max {sysctl.get('pid_max')}, "
        f"max_map_count {sysctl.get('max_map_count')}",
        f"- {packages}; load generator and reference server built with {env.get('compiler')} "
        f"{' '.join(env.get('cflags', []))}",
        f"- {'quick' if config.get('quick') else 'full'} mode: {config.get('repeats')} repeat(s); "
        f"per run a fresh server, a {config.get('throwaway', 0)} s throwaway run of the same "
        f"load against it, then {config.get('warmup')} s warm-up + {config.get('duration')} s "
        "measured against the same process; peers interleaved"
        + (
            f"; the whole run took {config['wall_seconds'] / 60:.0f} minutes"
            if config.get("wall_seconds")
            else ""
        ),
        f"- seed server: print {config.get('seed_print')}",
        # Workloads re-run later (after a change) and merged in place of the first runs.
        *(f"- {note}" for note in config.get("replaced", [])),
    ]
    foreign = [float(r["foreign_cpu"]) for r in results.get("runs", []) if "foreign_cpu" in r]
    if foreign:
        lines.append(
            "- CPU used by other processes during the runs: median "
            f"{statistics.median(foreign):.0%}, max {max(foreign):.0%} of the machine"
        )
        if statistics.median(foreign) > BUSY_SHARE:
            lines.append(
                "- **other work was running on this machine during the runs: the numbers are "
                "noisy; rerun on a quiet machine before drawing conclusions**"
            )
    removed = config.get("server_env_removed")
    if removed:
        lines.append(f"- removed from the servers' environment: {', '.join(removed)}")
    for name, reason in config.get("skipped_peers", {}).items():
        lines.append(f"- **{name} not run**: {reason}")
    lines.append("")
    lines.append("Peers:")
    lines.append("")
    for name, note in config.get("peer_notes", {}).items():
        lines.append(f"- `{name}`: {note}")
    return [*lines, ""]


# ---- goals (issue 7) ----


@dataclass(frozen=True)
class Goal:
    text: str
    measured: str
    met: bool | None  # None: not measured in this run


def _case_runs(
    grouped: dict[CaseKey, dict[str, list[Run]]], workload: str, conns: int, peer: str
) -> list[Run]:
    """The runs of `peer` on the case with this workload and connection count (any size)."""
    runs: list[Run] = []
    for key, by_peer in grouped.items():
        if key[0] == workload and key[1] == conns and (workload != "echo" or key[2] == 1024):
            runs += by_peer.get(peer, [])
    return runs


def _ratio_goal(
    grouped: dict[CaseKey, dict[str, list[Run]]],
    text: str,
    workload: str,
    conns: int,
    baseline: str,
    metric: str,
    floor: float | None = None,
    ceiling: float | None = None,
    worst: bool = False,
) -> Goal:
    """threadserve / baseline on `metric`, per repeat; the median (or the worst
    repeat, with `worst`) must be at least `floor` or at most `ceiling`."""
    summary = ratio_summary(
        _case_runs(grouped, workload, conns, "threadserve"),
        _case_runs(grouped, workload, conns, baseline),
        metric,
    )
    if summary is None:
        return Goal(text, "not measured", None)
    if floor is not None:
        value = summary.low if worst else summary.median
        met = value >= floor
    else:
        assert ceiling is not None
        value = summary.high if worst else summary.median
        met = value <= ceiling
    return Goal(text, fmt_ratio(summary) + (" (worst repeat decides)" if worst else ""), met)


def _absolute_goal(
    grouped: dict[CaseKey, dict[str, list[Run]]],
    text: str,
    workload: str,
    conns: int,
    metric: str,
    ceiling: float,
    variant: str = "",
) -> Goal:
    runs = [
        run
        for key, by_peer in grouped.items()
        if key[0] == workload and key[1] == conns and key[3] == variant
        for run in by_peer.get("threadserve", [])
    ]
    summary = summarize(
        float(run["metrics"][metric]) for run in runs if run["metrics"].get(metric) is not None
    )
    if summary is None:
        return Goal(text, "not measured", None)
    measured = fmt_range(summary, _fmt_seconds)
    met = summary.median <= ceiling and all(run["ok"] for run in runs)
    if workload == "stop":
        told = [int(run["metrics"].get("notice", 0)) for run in runs]
        measured += f"; clients told: {', '.join(f'{t:,}' for t in told)} of {conns:,}"
        met = met and all(t == conns for t in told)
    return Goal(text, measured, met)


def goals(grouped: dict[CaseKey, dict[str, list[Run]]]) -> list[Goal]:
    """The goals of issue 7, each from the runs of this results file."""
    out: list[Goal] = []
    # threadserve at least level with a baseline, at each connection count.
    level = [
        ("echo", "echo 1 KiB", "throughput", "threads-bare", "throughput_rps", (10, 100, 1_000)),
        ("echo", "echo 1 KiB", "throughput", "asyncio-protocol", "throughput_rps", (10, 100)),
        ("short", "short", "connections/s", "asyncio-protocol", "conns_per_s", (10, 100)),
    ]
    for workload, label, what, baseline, metric, counts in level:
        for n in counts:
            text = f"{label} x{n:,}: {what} >= 1.0{TIMES} {baseline}"
            out.append(_ratio_goal(grouped, text, workload, n, baseline, metric, floor=1.0))
    out.append(
        _ratio_goal(
            grouped,
            f"blocking 10 ms x1,000: throughput >= 1.0{TIMES} asyncio-pool",
            "blocking",
            1_000,
            "asyncio-pool",
            "throughput_rps",
            floor=1.0,
        )
    )
    out.append(
        _ratio_goal(
            grouped,
            f"blocking 10 ms x1,000: p99 <= 2{TIMES} asyncio-pool's, every repeat",
            "blocking",
            1_000,
            "asyncio-pool",
            "p99_us",
            ceiling=2.0,
            worst=True,
        )
    )
    mixed = ("mixed", 50, "asyncio-protocol")
    out += [
        _ratio_goal(
            grouped,
            f"mixed 50+50: short connections/s >= 0.5{TIMES} asyncio-protocol",
            *mixed,
            "conns_per_s",
            floor=0.5,
        ),
        _ratio_goal(
            grouped,
            f"mixed 50+50: short-connection p99 <= 3{TIMES} asyncio-protocol's",
            *mixed,
            "short_p99_us",
            ceiling=3.0,
        ),
        _ratio_goal(
            grouped,
            f"mixed 50+50: busy throughput >= 1.0{TIMES} asyncio-protocol",
            *mixed,
            "throughput_rps",
            floor=1.0,
        ),
        _absolute_goal(
            grouped,
            "10,000 connections: all accepted and echoed once within 1.5 s",
            "idle",
            10_000,
            "accept_seconds",
            1.5,
        ),
        _absolute_goal(
            grouped,
            "10,000 connections: SIGTERM to exit within 1.0 s, every client told",
            "stop",
            10_000,
            "exit_seconds",
            1.0,
            variant="idle",
        ),
    ]
    return out


def _goals_section(grouped: dict[CaseKey, dict[str, list[Run]]]) -> list[str]:
    rows = []
    for goal in goals(grouped):
        verdict = "not measured" if goal.met is None else ("met" if goal.met else "**not met**")
        rows.append([goal.text, goal.measured, verdict])
    if all(row[2] == "not measured" for row in rows):
        return []
    return [
        "## Goals (issue 7)",
        "",
        "threadserve against the peer named, every server warm. A ratio is taken between",
        "the two peers' runs of the same repeat; the cell shows the median and, in",
        "brackets, the range over repeats. A goal is met when the median meets it (for p99",
        '"every repeat", when the worst repeat does). The 10,000-connection goals are',
        "times, median and range.",
        "",
        *table(["goal", "measured", "verdict"], rows),
    ]


# ---- short connections, mixed load, steadiness ----


def _short_section(grouped: dict[CaseKey, dict[str, list[Run]]], peers: list[str]) -> list[str]:
    keys = sorted(k for k in grouped if k[0] == "short")
    if not keys:
        return []
    header = ["peer", *[f"{k[1]:,} clients" for k in keys]]
    lines = [
        "## Short connections",
        "",
        f"Each client: connect, one {keys[0][2]} B echo, close; then the next connection.",
        f"Connections completed per second, median (min{DASH}max) over repeats.",
        "",
    ]
    peers = peers_in(grouped, peers, keys)
    lines += table(header, peer_rows(grouped, peers, keys, range_cell("conns_per_s", fmt_count)))
    for baseline in ("asyncio-protocol", "threads-bare"):
        if any(baseline in grouped[key] for key in keys):
            lines += [f"Ratio to {baseline}, same repeat.", ""]
            cell = ratio_cell(baseline, "conns_per_s")
            lines += table(header, peer_rows(grouped, peers, keys, cell))
    lines += ["Connect to close (the server's EOF), p50 / p99, medians over repeats.", ""]
    cell = latency_cell(("short_p50_us", "short_p99_us"))
    lines += table(header, peer_rows(grouped, peers, keys, cell))
    return lines


def _mixed_section(grouped: dict[CaseKey, dict[str, list[Run]]], peers: list[str]) -> list[str]:
    keys = sorted(k for k in grouped if k[0] == "mixed")
    if not keys:
        return []
    key = keys[0]
    runs_of = grouped[key]
    lines = [
        "## Mixed load",
        "",
        f"{key[1]} busy echo connections ({key[2]} B, closed loop) beside {key[1]} clients",
        "opening short connections (64 B echo each). Medians (min" + DASH + "max) over repeats;",
        "ratios to asyncio-protocol are per repeat.",
        "",
    ]
    rows = []
    for peer in peers:
        runs = runs_of.get(peer, [])
        if not runs:
            continue
        theirs = runs_of.get("asyncio-protocol", [])
        p50 = metric_summary(runs, "short_p50_us")
        p99 = metric_summary(runs, "short_p99_us")
        rows.append(
            [
                peer + marks(runs),
                fmt_range(metric_summary(runs, "conns_per_s"), fmt_count),
                f"{fmt_us(p50.median) if p50 else DASH} / {fmt_us(p99.median) if p99 else DASH}",
                fmt_range(metric_summary(runs, "throughput_rps"), fmt_count),
                fmt_ratio(ratio_summary(runs, theirs, "conns_per_s")),
                fmt_ratio(ratio_summary(runs, theirs, "short_p99_us")),
                fmt_ratio(ratio_summary(runs, theirs, "throughput_rps")),
            ]
        )
    header = [
        "peer",
        "short conns/s",
        "short p50 / p99",
        "busy req/s",
        "conns/s ratio",
        "p99 ratio",
        "busy ratio",
    ]
    return lines + table(header, rows)


def _steady_section(runs: list[Run], peers: list[str]) -> list[str]:
    load = [r for r in runs if r["ok"] and "slice_spread" in r["metrics"]]
    if not load:
        return []
    lines = [
        "## Warm and steady",
        "",
        "Every server had a throwaway run of the same load before its measured run. Two",
        "checks that the measured figure is the warm, steady one: `measured/throwaway` is",
        "the measured run's rate over the throwaway run's (near 1.0 when the throwaway was",
        "already warm; well above 1.0 would mean the throwaway was too short), and",
        "`slice spread` is the largest deviation of one slice of the measured window (1 s;",
        "a third of it in shorter runs) from the window's mean. Runs with a spread above",
        f"{UNSTEADY_SPREAD:.0%} are marked {UNSTEADY_MARK} in the tables. Medians (max) over the",
        "peer's load runs.",
        "",
    ]

    def cells(mine: list[Run]) -> list[str]:
        ratio = summarize(
            float(r["metrics"]["measured_to_throwaway"])
            for r in mine
            if r["metrics"].get("measured_to_throwaway") is not None
        )
        spread = summarize(
            float(r["metrics"]["slice_spread"])
            for r in mine
            if r["metrics"].get("slice_spread") is not None
        )
        unsteady = sum(1 for r in mine if (r["metrics"].get("slice_spread") or 0) > UNSTEADY_SPREAD)
        return [
            f"{ratio.median:.2f} ({ratio.low:.2f}{DASH}{ratio.high:.2f})" if ratio else DASH,
            f"{spread.median:.0%} (max {spread.high:.0%})" if spread else DASH,
            f"{unsteady}/{len(mine)}",
        ]

    header = ["peer", "measured/throwaway", "slice spread", "unsteady runs"]
    return lines + table(header, rows_over_runs(load, peers, cells))


# ---- the steps after the runs ----

COLDSTART_TEXT = [
    "### Why a fresh asyncio server is slow",
    "",
    "asyncio's selector transport reads with `sock.recv(256 * 1024)`: every read",
    "allocates a 256 KiB bytes object and then shrinks it to the bytes received.",
    "glibc's malloc serves any request at or above its mmap threshold (128 KiB at",
    "start) with a fresh `mmap`, so in a fresh process every read maps memory, faults",
    "its pages in and unmaps it again: two minor page faults per 1 KiB echo. glibc",
    "raises the threshold (and the heap's trim threshold with it) the first time the",
    "program frees an mmapped block larger than the threshold. In an echo server that",
    "happens when the first client leaves: `recv` returns b'' and the 256 KiB buffer",
    "is freed unshrunk. From then on the buffers come from the heap and are reused, and",
    "the faults stop. So a fresh asyncio server runs slow until its first client",
    "disconnects, which, under a benchmark that connects all its clients first and",
    "closes them at the end, is the whole first run. Setting `MALLOC_MMAP_THRESHOLD_`",
    "or `MALLOC_TRIM_THRESHOLD_` alone turns the dynamic adjustment off and keeps it",
    "slow for good (the mmap threshold alone leaves the heap trimmed and regrown on",
    "every read: one fault per request; the trim threshold alone leaves every read",
    "mmapped: two); setting both makes it fast from the start. threadserve reads into",
    "64 KiB, below the threshold, and is not affected. Every measured run here follows",
    "a throwaway run whose clients have all closed, so every server is past this.",
    "",
    "The experiment (`python -m bench.coldstart`): a fresh server, two back-to-back",
    "runs of 100 connections echoing 1 KiB, with the server's minor page faults per",
    "request. Faults per request are the signal; throughput moves with them.",
    "",
]


def _coldstart_section(extras: dict[str, Any]) -> list[str]:
    result = extras.get("coldstart")
    if not result:
        return []
    if "error" in result:
        return [*COLDSTART_TEXT, f"The experiment failed in this run: {result['error']}", ""]
    return [*COLDSTART_TEXT, coldstart.markdown_table(result), ""]


def _crosscheck_section(extras: dict[str, Any]) -> list[str]:
    result = extras.get("crosscheck")
    if not result:
        return []
    lines = [
        "## Cross-check with wrk",
        "",
        "One cell measured by a load generator nobody in this project wrote: echo of",
        f"1 KiB over {result.get('conns', 100)} connections, by bench/loadgen.c and by `wrk`",
        "(Debian's package; one thread, closed loop, its request written as a 1,024-byte HTTP",
        "response so that the echo parses as one), each against the same warm server,",
        "alternating which goes first (bench/crosscheck.py). Requests per second, median",
        f"(min{DASH}max) over repeats; p99 medians.",
        "",
    ]
    if "error" in result:
        return [*lines, f"Not run: {result['error']}", ""]
    rows_by_peer: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in result["rows"]:
        rows_by_peer[row["peer"]].append(row)
    rows = []
    for peer, mine in rows_by_peer.items():
        cells = [peer]
        for tool in ("loadgen", "wrk"):
            rate = summarize(float(r[tool]["throughput_rps"]) for r in mine)
            p99 = summarize(float(r[tool]["p99_us"]) for r in mine if r[tool].get("p99_us"))
            cells.append(fmt_range(rate, fmt_count))
            cells.append(fmt_us(p99.median) if p99 else DASH)
        errors = sum(int(r["wrk"]["errors"]) + int(r["wrk"]["non_2xx"]) for r in mine)
        cells.append(str(errors))
        rows.append(cells)
    header = ["peer", "loadgen req/s", "loadgen p99", "wrk req/s", "wrk p99", "wrk errors"]
    lines += table(header, rows)
    ts, aio = rows_by_peer.get("threadserve", []), rows_by_peer.get("asyncio-protocol", [])
    if ts and aio:
        for tool in ("loadgen", "wrk"):
            ratios = [
                float(t[tool]["throughput_rps"]) / float(a[tool]["throughput_rps"])
                for t in ts
                for a in aio
                if t["repeat"] == a["repeat"] and float(a[tool]["throughput_rps"]) > 0
            ]
            lines.append(
                f"- threadserve / asyncio-protocol by {tool}: {fmt_ratio(summarize(ratios))}"
            )
        lines.append("")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    runs: list[Run] = results.get("runs", [])
    grouped = group(runs)
    peers = ordered_peers(runs)
    config = results.get("config", {})
    extras: dict[str, Any] = results.get("extras", {})
    lines = [
        "# Benchmark results",
        "",
        f"{'Quick smoke run' if config.get('quick') else 'Full run'}: "
        f"{len(runs)} runs, {sum(1 for r in runs if not r['ok'])} failed. "
        f"{CLIENT_BOUND_MARK} = load generator near a full core (client-bound); "
        f"{STARVED_MARK} = some connections completed no request in the measured window; "
        f"{UNSTEADY_MARK} = throughput not steady within the measured window; "
        f"{FAILED_MARK}N = N runs failed (see results.json). "
        "Regenerate with `python -m bench` (`--quick` for a smoke run, into bench/scratch/).",
        "",
    ]
    lines += _goals_section(grouped)
    sizes = sorted({k[2] for k in grouped if k[0] == "echo"})
    for size in sizes:
        label = f"{size} B" if size < 1024 else f"{size // 1024} KiB"
        lines += _load_sections(grouped, peers, "echo", size, f"Echo, {label} messages")
    lines += _short_section(grouped, peers)
    for size in sorted({k[2] for k in grouped if k[0] == "blocking"}):
        lines += _load_sections(
            grouped, peers, "blocking", size, f"Blocking work, 10 ms per request ({size} B)"
        )
    lines += _mixed_section(grouped, peers)
    lines += _idle_section(grouped, peers)
    lines += _stop_section(grouped, peers)
    lines += _floor_section(extras.get("floor") or results.get("thread_floor"))
    lines += _crosscheck_section(extras)
    lines += _steady_section(runs, peers)
    lines += _generator_section(runs, peers)
    lines += _environment_section(results)
    lines += _coldstart_section(extras)
    failures = [r for r in runs if not r["ok"]]
    if failures:
        lines += ["## Failed runs", ""]
        lines += [
            f"- {r['peer']} {' '.join(filter(None, [r['workload'], r['variant']]))} "
            f"{r['conns']:,} conns {r['size']} B, repeat {r['repeat'] + 1}: {r['error']}"
            for r in failures
        ]
        lines.append("")
    return "\n".join(lines)


# ---- charts ----


def _style(peer: str) -> dict[str, Any]:
    index = PEER_ORDER.index(peer) if peer in PEER_ORDER else len(PEER_ORDER)
    markers = "os^v<>DPX*"
    style: dict[str, Any] = {
        "marker": markers[index % len(markers)],
        "color": plt.get_cmap("tab10")(index % 10),
        "linewidth": 1.3,
        "markersize": 5,
    }
    if peer == "threadserve":
        style.update(linewidth=2.8, markersize=7)
    if peer == "c-epoll":
        style.update(linestyle="--")
    return style


def _minor_label(value: float) -> str:
    """Label only the 2x and 5x minor ticks of a log axis, to stay legible."""
    if value <= 0:
        return ""
    leading = value / 10 ** math.floor(math.log10(value))
    return fmt_count(value) if round(leading) in (2, 5) else ""


def _series(
    grouped: dict[CaseKey, dict[str, list[Run]]], peer: str, keys: list[CaseKey], metric: str
) -> tuple[list[int], list[float], list[float], list[float]]:
    xs, mid, low, high = [], [], [], []
    for key in keys:
        summary = metric_summary(grouped[key].get(peer, []), metric)
        if summary is None:
            continue
        xs.append(key[1])
        mid.append(summary.median)
        low.append(summary.median - summary.low)
        high.append(summary.high - summary.median)
    return xs, mid, low, high


def _line_chart(
    grouped: dict[CaseKey, dict[str, list[Run]]],
    peers: list[str],
    workload: str,
    metric: str,
    ylabel: str,
    title: str,
    path: Path,
    scale: float = 1.0,
    logy: bool = True,
) -> bool:
    sizes = sorted({k[2] for k in grouped if k[0] == workload})
    if not sizes:
        return False
    fig, axes = plt.subplots(1, len(sizes), figsize=(7.5 * len(sizes), 4.8), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        keys = sorted(k for k in grouped if k[0] == workload and k[2] == size)
        for peer in peers:
            xs, mid, low, high = _series(grouped, peer, keys, metric)
            if not xs:
                continue
            ax.errorbar(
                xs,
                [v * scale for v in mid],
                yerr=[[v * scale for v in low], [v * scale for v in high]],
                label=peer,
                capsize=3,
                **_style(peer),
            )
        ax.set_xscale("log")
        ax.set_xticks([k[1] for k in keys])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_count(v)))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: _minor_label(v)))
        ax.set_xlabel("connections")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, {size} B" if size < 1024 else f"{title}, {size // 1024} KiB")
        ax.grid(True, which="both", alpha=0.3)
    # One legend for the figure, outside the axes, so it hides no line.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bar_chart(
    grouped: dict[CaseKey, dict[str, list[Run]]],
    peers: list[str],
    workload: str,
    metrics: list[tuple[str, str, float]],
    title: str,
    path: Path,
) -> bool:
    keys = sorted((k for k in grouped if k[0] == workload), key=lambda k: (k[3] != "idle", k[1]))
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.8), squeeze=False)
    width = 0.8 / len(keys)
    for ax, (metric, ylabel, scale) in zip(axes[0], metrics, strict=True):
        for offset, key in enumerate(keys):
            values = []
            for peer in peers:
                summary = metric_summary(grouped[key].get(peer, []), metric)
                if summary is None and workload == "stop":
                    # a failed stop still has a time (the timeout): show it
                    summary = summarize(
                        float(r["metrics"][metric])
                        for r in grouped[key].get(peer, [])
                        if metric in r["metrics"]
                    )
                values.append(summary.median * scale if summary else 0.0)
            label = f"{key[3]} {key[1]:,}".strip()
            positions = [i + offset * width for i in range(len(peers))]
            ax.bar(positions, values, width=width, label=label)
            for x, value, peer in zip(positions, values, peers, strict=True):
                if not value and grouped[key].get(peer):
                    # a zero bar would read as "costs nothing"; say why it is empty
                    ax.annotate("failed", (x, 0), ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(peers))])
        ax.set_xticklabels(peers, rotation=35, ha="right")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, title="connections")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_charts(results: dict[str, Any], out: Path) -> list[Path]:
    runs: list[Run] = results.get("runs", [])
    grouped = group(runs)
    peers = ordered_peers(runs)
    written = []
    charts: list[tuple[str, Callable[[Path], bool]]] = [
        (
            "echo_throughput.png",
            lambda p: _line_chart(
                grouped, peers, "echo", "throughput_rps", "requests/s", "Echo throughput", p
            ),
        ),
        (
            "echo_latency_p99.png",
            lambda p: _line_chart(
                grouped, peers, "echo", "p99_us", "p99 latency (ms)", "Echo p99 latency", p, 1e-3
            ),
        ),
        (
            "blocking_fraction.png",
            lambda p: _line_chart(
                grouped,
                peers,
                "blocking",
                "fraction_of_ideal",
                "throughput / ideal",
                "10 ms blocking call per request",
                p,
                logy=False,
            ),
        ),
        (
            "blocking_latency_p99.png",
            lambda p: _line_chart(
                grouped, peers, "blocking", "p99_us", "p99 latency (ms)", "Blocking p99", p, 1e-3
            ),
        ),
        (
            "idle_memory.png",
            lambda p: _bar_chart(
                grouped,
                peers,
                "idle",
                [
                    ("rss_per_conn_kib", "RSS per idle connection (KiB)", 1.0),
                    ("pte_per_conn_kib", "page tables per idle connection (bytes)", 1024.0),
                ],
                "Idle connections",
                p,
            ),
        ),
        (
            "stop_time.png",
            lambda p: _bar_chart(
                grouped,
                peers,
                "stop",
                [("exit_seconds", "SIGTERM to exit (s)", 1.0)],
                "Stop time (peers without a SIGTERM handler die at once; see RESULTS.md "
                "for what their clients saw)",
                p,
            ),
        ),
    ]
    for name, draw in charts:
        path = out / name
        if draw(path):
            written.append(path)
    return written


def write_all(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    charts = write_charts(results, out)
    text = render_markdown(results)
    if charts:
        text += "\n## Charts\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in charts) + "\n"
    (out / "RESULTS.md").write_text(text)
