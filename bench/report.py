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

from bench.thread_floor import markdown_table

Run = dict[str, Any]
CaseKey = tuple[str, int, int, str]  # workload, conns, size, variant

BASELINES = ("uvloop", "asyncio-protocol")
# Above this share of the machine's CPU used by other processes during the
# runs, the results are flagged as noisy.
BUSY_SHARE = 0.10
PEER_ORDER = (
    "threadserve",
    "seed",
    "socketserver",
    "asyncio-protocol",
    "asyncio-streams",
    "uvloop",
    "gevent",
    "trio",
    "c-epoll",
)
CLIENT_BOUND_MARK = "\u2021"  # double dagger
STARVED_MARK = "\u00a7"  # section sign
FAILED_MARK = "\u2717"  # ballot x
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
    failed = sum(1 for run in runs if not run["ok"])
    if failed:
        out += f" {FAILED_MARK}{failed}"
    return out


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


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

    lines += [f"Requests per second, median (min{DASH}max) over repeats.", ""]
    rows = []
    for peer in peers:
        row = [peer]
        for key in keys:
            runs = grouped[key].get(peer, [])
            cell = fmt_range(metric_summary(runs, "throughput_rps"), fmt_count) if runs else ""
            row.append(cell + marks(runs))
        rows.append(row)
    lines += table(header, rows)

    if workload == "blocking":
        lines += ["Fraction of the ideal (connections / 10 ms), median.", ""]
        rows = []
        for peer in peers:
            row = [peer]
            for key in keys:
                summary = metric_summary(grouped[key].get(peer, []), "fraction_of_ideal")
                row.append(f"{summary.median:.1%}" if summary else DASH)
            rows.append(row)
        lines += table(header, rows)

    for baseline in BASELINES:
        if not any(baseline in grouped[key] for key in keys):
            continue
        lines += [f"Throughput ratio to {baseline}, same repeat, median (min{DASH}max).", ""]
        rows = []
        for peer in peers:
            row = [peer]
            for key in keys:
                theirs = grouped[key].get(baseline, [])
                row.append(
                    fmt_ratio(ratio_summary(grouped[key].get(peer, []), theirs, "throughput_rps"))
                )
            rows.append(row)
        lines += table(header, rows)

    lines += ["Latency p50 / p99 / p99.9, medians over repeats.", ""]
    rows = []
    for peer in peers:
        row = [peer]
        for key in keys:
            runs = grouped[key].get(peer, [])
            parts = [metric_summary(runs, m) for m in ("p50_us", "p99_us", "p999_us")]
            row.append(" / ".join(fmt_us(p.median) if p else DASH for p in parts))
        rows.append(row)
    lines += table(header, rows)
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
    rows = []
    for peer in peers:
        row = [peer]
        for key in keys:
            runs = grouped[key].get(peer, [])
            if not runs:
                row += ["", "", "", ""]
                continue
            rss = metric_summary(runs, "rss_per_conn_kib")
            pte = metric_summary(runs, "pte_per_conn_kib")
            threads = metric_summary(runs, "threads_per_conn")
            accept = metric_summary(runs, "accept_seconds")
            row += [
                (f"{rss.median:.1f} KiB" if rss else DASH) + marks(runs),
                f"{pte.median * 1024:.0f} B" if pte else DASH,
                f"{threads.median:.2f}" if threads else DASH,
                fmt_range(accept, lambda v: f"{v:.2f} s"),
            ]
        rows.append(row)
    return lines + table(header, rows)


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
    rows = []
    for peer in peers:
        row = [peer]
        for key in keys:
            runs = grouped[key].get(peer, [])
            if not runs:
                row.append("")
                continue
            exit_time = summarize(
                float(run["metrics"]["exit_seconds"])
                for run in runs
                if "exit_seconds" in run["metrics"]
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
            row.append(
                f"{fmt_range(exit_time, _fmt_seconds)}, exit {code}{killed}; "
                + ", ".join(seen)
                + marks(runs).replace(CLIENT_BOUND_MARK, "")
            )
        rows.append(row)
    return lines + table(header, rows)


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
    load = [r for r in runs if r["workload"] in ("echo", "blocking") and r["ok"]]
    if not load:
        return []
    lines = [
        "## Load generator check",
        "",
        "CPU use during the measured window, as a fraction of one core, medians over all",
        "echo and blocking runs. A run where the generator used 90% or more is marked",
        f"{CLIENT_BOUND_MARK} in the tables: there the generator, not the server, may be the",
        "limit. A server column near 100% for c-epoll shows the generator saturating the",
        "compiled server.",
        "",
    ]
    rows = []
    for peer in peers:
        mine = [r for r in load if r["peer"] == peer]
        if not mine:
            continue
        server = summarize(float(r["metrics"]["server_cpu"] or 0) for r in mine)
        client = summarize(float(r["metrics"]["client_cpu"] or 0) for r in mine)
        bound = sum(1 for r in mine if r["metrics"].get("client_bound"))
        rows.append(
            [
                peer,
                f"{server.median:.0%}" if server else DASH,
                f"{client.median:.0%}" if client else DASH,
                f"{bound}/{len(mine)}",
            ]
        )
    return lines + table(["peer", "server CPU", "generator CPU", "client-bound runs"], rows)


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
        f"- {'quick' if config.get('quick') else 'full'} mode: {config.get('repeats')} repeat(s), "
        f"{config.get('warmup')} s warm-up + {config.get('duration')} s measured per run, "
        "a fresh server per run, peers interleaved",
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


def render_markdown(results: dict[str, Any]) -> str:
    runs: list[Run] = results.get("runs", [])
    grouped = group(runs)
    peers = ordered_peers(runs)
    config = results.get("config", {})
    lines = [
        "# Benchmark results",
        "",
        f"{'Quick smoke run' if config.get('quick') else 'Full run'}: "
        f"{len(runs)} runs, {sum(1 for r in runs if not r['ok'])} failed. "
        f"{CLIENT_BOUND_MARK} = load generator near a full core (client-bound); "
        f"{STARVED_MARK} = some connections completed no request in the measured window; "
        f"{FAILED_MARK}N = N runs failed (see results.json). "
        "Regenerate with `python -m bench` (`--quick` for this smoke run).",
        "",
    ]
    sizes = sorted({k[2] for k in grouped if k[0] == "echo"})
    for size in sizes:
        label = f"{size} B" if size < 1024 else f"{size // 1024} KiB"
        lines += _load_sections(grouped, peers, "echo", size, f"Echo, {label} messages")
    for size in sorted({k[2] for k in grouped if k[0] == "blocking"}):
        lines += _load_sections(
            grouped, peers, "blocking", size, f"Blocking work, 10 ms per request ({size} B)"
        )
    lines += _idle_section(grouped, peers)
    lines += _stop_section(grouped, peers)
    lines += _floor_section(results.get("thread_floor"))
    lines += _generator_section(runs, peers)
    lines += _environment_section(results)
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
