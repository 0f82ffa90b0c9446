"""The workloads: what a case is, which cases a run plans, how one runs.

echo      closed-loop echo, 1 KiB (64 B on request), throughput and latency
short     connect, one 64 B echo, close, by 10 or 100 clients at once:
          connections per second and the connect-to-close time
blocking  each request makes a 10 ms blocking call; throughput vs the ideal
mixed     50 busy echo connections (512 B) beside 50 clients opening short
          connections: are new clients served while old ones are busy?
idle      RSS and page tables per idle connection, and time to accept them
stop      SIGTERM to exit with idle or active connections, and what clients saw

Every case starts a fresh server, so no run inherits another's state (threads
left over, a grown heap, a full accept queue), and warms it before measuring:
a throwaway run of the same load first (for idle and stop, a short echo run),
then the measured run against the same process. A fresh CPython server can be
several times slower for its first seconds (see `bench.coldstart`); a cold
figure is not the server's figure.
"""

from __future__ import annotations

import os
import resource
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.client import CONNECT_WINDOW, JsonDict, Session, run_echo
from bench.peerlist import PEERS as ALL_PEERS
from bench.peerlist import Peer
from bench.peers._common import BLOCKING_SECONDS
from bench.server import ServerProcess, ServerStuck, free_port

WORKLOADS = ("echo", "short", "blocking", "mixed", "idle", "stop")
LOAD_WORKLOADS = frozenset({"echo", "short", "blocking", "mixed"})

# Peers that carry the project's goals (issue 7) and its ceiling references;
# the other peers add context where they say something new, and are left out
# of cases where they would only lengthen the run.
GOAL_PEERS = ("threadserve", "threads-bare", "asyncio-protocol", "uvloop", "c-epoll")
# Short and mixed add gevent, the other model with cheap per-connection tasks.
CHURN_PEERS = (*GOAL_PEERS, "gevent")
SHORT_SIZE = 64
MIXED_BUSY, MIXED_SHORT, MIXED_SIZE = 50, 50, 512


@dataclass(frozen=True)
class Case:
    workload: str
    conns: int  # busy connections (short: the clients opening connections)
    size: int = 64
    variant: str = ""  # stop: "idle" or "active"
    short: int = 0  # mixed: clients opening short connections beside the busy ones
    # Peers this case runs against (when they serve the workload); None = all.
    peers: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        if self.workload == "echo":
            return f"echo {self.size} B x{self.conns}"
        if self.workload == "stop":
            return f"stop {self.variant} x{self.conns}"
        if self.workload == "mixed":
            return f"mixed {self.conns}+{self.short}"
        return f"{self.workload} x{self.conns}"

    def runs_on(self, peer: str) -> bool:
        return self.peers is None or peer in self.peers


@dataclass(frozen=True)
class Settings:
    binaries: dict[str, Path]
    throwaway: float  # seconds of the unmeasured run against a fresh server
    warmup: float  # unmeasured seconds at the start of the measured run
    duration: float
    connect_timeout: float
    settle: float  # pause before reading idle memory, for threads to park
    stop_timeout: float  # how long a server may take to exit after SIGTERM
    observe_timeout: float  # how long clients watch their connections end
    server_cpu: int | None
    client_cpu: int | None


def plan(
    workloads: list[str],
    quick: bool,
    echo_conns: list[int] | None = None,
    sizes: list[int] | None = None,
) -> list[Case]:
    """The cases to run, in order; quick mode is a subset of the full plan.

    The full plan keeps every case the goals need and cuts what says little,
    so that three repeats fit in about 35 minutes: one message size (1 KiB;
    64 B behaved alike in every earlier run), no single-connection echo (it
    measures latency, which the other cases report too), blocking at 1,000
    connections only (the goal's case; 100 is in quick runs), socketserver and
    asyncio-streams (threads-bare and asyncio with more overhead) at 100 echo
    connections only, short and mixed without the peers that add nothing
    there, and the cases at 10,000 connections, the slowest to set up, only
    for the goal peers. `--conns` and `--sizes` bring any echo case back, for every peer.
    """
    custom_echo = echo_conns is not None or sizes is not None
    if echo_conns is None:
        echo_conns = [10, 100] if quick else [10, 100, 1_000, 10_000]
    if sizes is None:
        sizes = [1024]
    cases: list[Case] = []
    if "echo" in workloads:
        cases += [
            Case("echo", n, size, peers=None if quick or custom_echo else _echo_peers(n))
            for size in sizes
            for n in echo_conns
        ]
    if "short" in workloads:
        churn = None if quick else CHURN_PEERS
        cases += [Case("short", n, SHORT_SIZE, peers=churn) for n in (10, 100)]
    if "blocking" in workloads:
        cases += [Case("blocking", n) for n in ([100] if quick else [1_000])]
    if "mixed" in workloads:
        churn = None if quick else CHURN_PEERS
        cases += [Case("mixed", MIXED_BUSY, MIXED_SIZE, short=MIXED_SHORT, peers=churn)]
    if "idle" in workloads:
        idle = [1_000] if quick else [10_000]
        idle_peers = None if quick else ("threadserve", "threads-bare", "asyncio-protocol")
        cases += [Case("idle", n, peers=idle_peers) for n in idle]
    if "stop" in workloads:
        # Only threadserve handles SIGTERM; the others die at once, and one of
        # them (asyncio) shows what that means for clients.
        stop_peers = ("threadserve", "threads-bare", "asyncio-protocol")
        stop_idle = [1_000] if quick else [10_000]
        cases += [Case("stop", n, variant="idle", peers=stop_peers) for n in stop_idle]
        cases += [Case("stop", 1_000, variant="active", peers=stop_peers)]
    return cases


def _echo_peers(conns: int) -> tuple[str, ...] | None:
    """Who runs the full plan's echo case at `conns` connections.

    Every peer at 100; socketserver and asyncio-streams (threads-bare and
    asyncio-protocol with more overhead) only there; at 10,000 the goal peers.
    """
    if conns >= 10_000:
        return GOAL_PEERS
    if conns == 100:
        return None
    return tuple(name for name in ALL_PEERS if name not in ("socketserver", "asyncio-streams"))


def run_case(case: Case, peer: Peer, settings: Settings, repeat: int) -> dict[str, Any]:
    """Run one case against one peer; never raises, failures are recorded."""
    record: dict[str, Any] = {
        "workload": case.workload,
        "peer": peer.name,
        "conns": case.conns,
        "size": case.size,
        "variant": case.variant,
        "short": case.short,
        "repeat": repeat,
        "ok": False,
        "error": None,
        "metrics": {},
    }
    record["loadavg_1min"] = os.getloadavg()[0]
    cpu_before = _cpu_snapshot()
    started = time.monotonic()
    port = free_port()
    try:
        argv = peer.command(port, case.workload, case.conns)
        with ServerProcess(argv, port, settings.server_cpu) as server:
            server.wait_listening(timeout=30)
            _warm(case, settings, server, record)
            if case.workload in LOAD_WORKLOADS:
                _run_load(case, settings, server, record)
            elif case.workload == "idle":
                _run_idle(case, settings, server, record)
            else:
                _run_stop(case, settings, server, record)
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=5)
    elapsed = time.monotonic() - started
    record["elapsed"] = round(elapsed, 3)
    record["foreign_cpu"] = _foreign_cpu(cpu_before, _cpu_snapshot(), elapsed)
    return record


def _cpu_snapshot() -> tuple[float, float]:
    """(CPU seconds used on the whole machine, CPU seconds used by us).

    The machine's figure is user + nice + system from /proc/stat; interrupt
    time is left out because loopback traffic is ours but is not charged to
    any process. Ours is this process plus its reaped children (the server
    and the load generator are always reaped before a run ends).
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    ticks = os.sysconf("SC_CLK_TCK")
    machine = (int(fields[1]) + int(fields[2]) + int(fields[3])) / ticks
    ours = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        ours += usage.ru_utime + usage.ru_stime
    return machine, ours


def _foreign_cpu(before: tuple[float, float], after: tuple[float, float], wall: float) -> float:
    """Share of the machine's CPUs used by other processes during a run.

    Load average cannot tell: thousands of runnable server threads inflate it.
    """
    if wall <= 0:
        return 0.0
    foreign = (after[0] - before[0]) - (after[1] - before[1])
    return max(foreign, 0.0) / (wall * (os.cpu_count() or 1))


def _errors(client: JsonDict) -> int:
    return int(sum(client.get("errors", {}).values()))


def _load(case: Case, s: Settings, server: ServerProcess, duration: float) -> JsonDict:
    """One run of the case's load; short connections are clients of their own."""
    short_only = case.workload == "short"
    return run_echo(
        s.binaries["loadgen"],
        port=server.port,
        conns=0 if short_only else case.conns,
        size=case.size,
        short=case.conns if short_only else case.short,
        short_size=SHORT_SIZE,
        warmup=s.warmup,
        duration=duration,
        connect_timeout=s.connect_timeout,
        server_pid=server.pid,
        cpu=s.client_cpu,
    )


def _warm(case: Case, s: Settings, server: ServerProcess, record: dict[str, Any]) -> None:
    """The unmeasured run that brings a fresh server to its steady state.

    Load cases repeat their own load; idle and stop, which measure one
    accept and one stop, get a 100-connection echo run. Either way every
    connection of the throwaway run is closed before the measured run, so
    the server has also seen clients leave (what flips glibc's malloc
    thresholds, see `bench.coldstart`).

    The measured run starts only once the server has closed every
    connection of the throwaway run. At 10,000 connections a thread-per-
    connection server takes seconds to end them all; started earlier, the
    measured run timed that ending instead (its connects waited behind
    10,000 threads), and a server that never got out of it was reported as
    "only 128/10000 connected" after a 60 s connect timeout. Now that case
    is reported as what it is, and the wait is recorded.
    """
    if s.throwaway <= 0:
        return
    warm_case = case if case.workload in LOAD_WORKLOADS else Case("echo", 100, 1024)
    client = _load(warm_case, s, server, s.throwaway)
    server.check_alive()
    settle = server.wait_settled(s.connect_timeout)
    server.check_alive()
    record["throwaway"] = {
        "workload": warm_case.workload,
        "conns": warm_case.conns,
        "seconds": s.throwaway,
        "throughput_rps": client["throughput_rps"],
        "short_rate": (client.get("short") or {}).get("rate"),
        "errors": _errors(client),
        "answered": client.get("ready"),
        # after the throwaway's clients left: how long until the server had
        # closed all their connections, and what it still held then
        "settle_seconds": round(settle.seconds, 3),
        "held_after": settle.held,
        "threads_after": settle.threads,
    }
    if settle.held:
        raise ServerStuck(
            f"server still held {settle.held}/{warm_case.conns} connections "
            f"{settle.seconds:.0f} s after the throwaway run's clients had left "
            f"({settle.threads} threads; throwaway run "
            f"{client['throughput_rps']:.0f} req/s); measured run not started"
        )


def slice_spread(slices: list[float]) -> float | None:
    """Largest deviation of one slice from the mean, as a fraction of the mean.

    Slices are the completions per second of the measured window: a warm,
    steady server keeps them within a few percent of each other.
    """
    if len(slices) < 2:
        return None
    mean = sum(slices) / len(slices)
    if mean <= 0:
        return None
    return max(abs(value - mean) for value in slices) / mean


def _run_load(case: Case, s: Settings, server: ServerProcess, record: dict[str, Any]) -> None:
    client = _load(case, s, server, s.duration)
    server.check_alive()
    memory = server.memory()
    record["client"] = client
    latency = client["latency_us"]
    short: JsonDict = client.get("short") or {}
    slices: JsonDict = client.get("slices") or {}
    steady_slices = slices.get("short") if case.workload == "short" else slices.get("requests")
    metrics: dict[str, Any] = {
        "throughput_rps": client["throughput_rps"],
        "p50_us": latency["p50"],
        "p99_us": latency["p99"],
        "p999_us": latency["p999"],
        "client_cpu": client["client_cpu"],
        "server_cpu": client["server_cpu"],
        # The generator is single-threaded: near one full core it may be
        # what limits the run rather than the server.
        "client_bound": (client["client_cpu"] or 0) >= 0.9,
        "connected": client["connected"],
        # connections that completed no request in the window: left in the
        # accept queue or never scheduled (unfair, not just slow)
        "starved": case.conns - max(int(client.get("served_in_window", case.conns)), 0),
        "errors": _errors(client),
        "server_rss_kib": memory.rss_kib,
        "server_threads": memory.threads,
        "slice_spread": slice_spread([float(v) for v in steady_slices or []]),
    }
    throwaway = record.get("throwaway") or {}
    warm_figure = throwaway.get("short_rate" if case.workload == "short" else "throughput_rps")
    measured_figure = short.get("rate") if case.workload == "short" else client["throughput_rps"]
    if warm_figure and measured_figure is not None:
        # measured / throwaway: near 1 when the throwaway run was warm already
        metrics["measured_to_throwaway"] = float(measured_figure) / float(warm_figure)
    if short:
        short_latency = short["latency_us"]
        metrics.update(
            conns_per_s=short["rate"],
            short_completed=short["completed"],
            short_connect_failures=short["connect_failures"],
            short_p50_us=short_latency["p50"],
            short_p99_us=short_latency["p99"],
            short_p999_us=short_latency["p999"],
        )
    if case.workload == "short":
        # a short case has no busy connection to starve
        metrics["starved"] = 0
    if case.workload == "blocking":
        ideal = case.conns / BLOCKING_SECONDS
        metrics["ideal_rps"] = ideal
        metrics["fraction_of_ideal"] = client["throughput_rps"] / ideal
    record["metrics"] = metrics
    problems = []
    busy = 0 if case.workload == "short" else case.conns
    answered = int(client["ready"])
    if answered < busy:
        # "connected" counts TCP handshakes, which the kernel completes for
        # a server that accepts nobody (up to its backlog); the generator
        # keeps CONNECT_WINDOW unanswered at a time, so a server that
        # stopped answering shows exactly that many "connected".
        problems.append(
            f"only {answered}/{busy} connections answered within "
            f"{s.connect_timeout:g} s ({client['connected']} TCP handshakes "
            f"done, at most {CONNECT_WINDOW} unanswered at a time)"
        )
    if metrics["errors"]:
        problems.append(f"{metrics['errors']} client errors {client['errors']}")
    if busy and client["requests"] == 0:
        problems.append("no request completed in the window")
    if short and short["completed"] == 0:
        problems.append("no short connection completed in the window")
    record["ok"] = not problems
    record["error"] = "; ".join(problems) or None


def _session(case: Case, s: Settings, server: ServerProcess, mode: str) -> Session:
    return Session(
        s.binaries["loadgen"],
        mode=mode,
        port=server.port,
        conns=case.conns,
        size=case.size,
        connect_timeout=s.connect_timeout,
        observe_timeout=s.observe_timeout,
        server_pid=server.pid,
        cpu=s.client_cpu,
    )


def _run_idle(case: Case, s: Settings, server: ServerProcess, record: dict[str, Any]) -> None:
    time.sleep(s.settle)
    before = server.memory()
    with _session(case, s, server, "hold") as session:
        ready = session.wait_ready(timeout=s.connect_timeout + 30)
        time.sleep(s.settle)
        server.check_alive()
        after = server.memory()
        client = session.finish(timeout=60, quit_first=True)
    held = max(int(ready["ready"]), 1)
    record["client"] = client
    record["server"] = {"before": asdict(before), "after": asdict(after)}
    record["metrics"] = {
        "ready": ready["ready"],
        "accept_seconds": ready["connect_seconds"],
        "rss_per_conn_kib": (after.rss_kib - before.rss_kib) / held,
        "pte_per_conn_kib": (after.pte_kib - before.pte_kib) / held,
        "threads_per_conn": (after.threads - before.threads) / held,
        "rss_after_kib": after.rss_kib,
        "pte_after_kib": after.pte_kib,
    }
    record["ok"] = ready["ready"] == case.conns and _errors(client) == 0
    if not record["ok"]:
        errors = {k: v for k, v in client.get("errors", {}).items() if v}
        record["error"] = f"{ready['ready']}/{case.conns} ready" + (
            f", client errors {errors}" if errors else ""
        )


def _run_stop(case: Case, s: Settings, server: ServerProcess, record: dict[str, Any]) -> None:
    mode = "hold" if case.variant == "idle" else "active"
    with _session(case, s, server, mode) as session:
        ready = session.wait_ready(timeout=s.connect_timeout + 30)
        session.stop()
        exit_ = server.terminate_and_time(s.stop_timeout)
        client = session.finish(timeout=s.observe_timeout + 30, quit_first=False)
    stop = client.get("stop") or {}
    record["client"] = client
    record["metrics"] = {
        "ready": ready["ready"],
        "exit_seconds": exit_.seconds,
        "returncode": exit_.returncode,
        "killed": exit_.killed,
        "clients_done_seconds": stop.get("last_end_seconds"),
        "notice": stop.get("notice_eof", 0)
        + stop.get("notice_reset", 0)
        + stop.get("notice_open", 0),
        "notice_eof": stop.get("notice_eof", 0),
        "notice_reset": stop.get("notice_reset", 0),
        "eof": stop.get("eof", 0),
        "reset": stop.get("reset", 0),
        "open": stop.get("open", 0) + stop.get("notice_open", 0),
        "other": stop.get("other", 0),
        "echoes_after_stop": stop.get("echoes_after_stop", 0),
        "unanswered": stop.get("unanswered", 0),
        # an echo cut off mid-message: the one sign of a half-written reply
        "partial_echoes": stop.get("partial_echoes", 0),
    }
    record["ok"] = ready["ready"] == case.conns and not exit_.killed
    if not record["ok"]:
        why = "killed after the stop timeout" if exit_.killed else "not all connected"
        record["error"] = f"{ready['ready']}/{case.conns} ready; {why}"
