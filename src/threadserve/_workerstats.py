"""Statistics across worker processes: one worker's snapshot on the wire, and their sum.

Theory of operation
===================

Each worker's ``Server`` counts for itself (``Server.statistics()``); the
supervisor (_supervisor.py), which serves the metrics when there are
workers, has no server of its own. So it asks: at scrape time it sends
every worker ``stats?`` on its control channel and the worker's heartbeat
thread answers with a snapshot, encoded here as one JSON packet. A worker
also sends a last snapshot when its server has stopped, just before it
exits, so what it did up to its very end is kept.

``WorkerStatistics`` (the supervisor's side) keeps the latest snapshot of
every live worker and the sum of the last snapshots of the workers gone
(``retired``). A scrape reports retired + live. Counters therefore never
go backwards when a worker is replaced, by a reload, recycling or a crash:
what a worker reported stays in the sum after it exits. What a worker
counted after its last snapshot and never reported is lost when it dies
without a last word (SIGKILL, a crash): the counters then miss those few
connections, they never count them twice or go down. Gauges (connections
active, idle threads, threads) are sums over the live workers only.

The snapshots are plain integers, per-reason counts and histograms: the
same ``ServerStatistics`` and ``Counters`` as one server, summed field by
field. Nothing here imports prometheus-client; _metrics.py turns the sum
into metric families.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

from ._events import CloseReason, Counters, Histogram, RejectReason, StopOutcome
from ._server import ServerStatistics

#: What the supervisor sends to ask a worker for a snapshot, and the prefix of the answer.
REQUEST = b"stats?"
REPLY = b"stats "


class RestartReason(Enum):
    """Why the supervisor replaced a worker (``threadserve_worker_restarts_total{reason}``)."""

    #: It died unasked: a crash, a signal, out of memory.
    CRASHED = "crashed"
    #: It stopped answering its heartbeat for ``--worker-timeout``: killed.
    HUNG = "hung"
    #: It reached ``--max-worker-connections``.
    RECYCLED = "recycled"
    #: A reload (SIGHUP) replaced it with a fresh one.
    RELOAD = "reload"
    #: A replacement could not start and was tried again.
    START_FAILED = "start_failed"


#: The plain integer fields of ServerStatistics (``counters`` aside).
_INT_FIELDS = tuple(f.name for f in fields(ServerStatistics) if f.name != "counters")


@dataclass(frozen=True)
class Snapshot:
    """One worker's statistics at one moment, or a sum of several."""

    statistics: ServerStatistics = field(default_factory=lambda: empty_statistics())
    #: Threads in the process (``threading.active_count()``).
    threads: int = 0

    def __add__(self, other: Snapshot) -> Snapshot:
        mine, theirs = self.statistics, other.statistics
        plain = {name: getattr(mine, name) + getattr(theirs, name) for name in _INT_FIELDS}
        return Snapshot(
            _statistics(plain, _add_counters(mine.counters, theirs.counters)),
            self.threads + other.threads,
        )

    def retired(self) -> Snapshot:
        """What stays of it once its worker is gone: the counts, no gauge."""
        return Snapshot(replace(self.statistics, connections_active=0, threads_idle=0), 0)


def empty_statistics() -> ServerStatistics:
    return _statistics(dict.fromkeys(_INT_FIELDS, 0), Counters())


def encode(statistics: ServerStatistics, threads: int) -> bytes:
    """The reply packet for ``statistics`` (see the module docstring)."""
    counters = statistics.counters
    body: dict[str, Any] = {name: getattr(statistics, name) for name in _INT_FIELDS}
    body["threads"] = threads
    body["closed"] = {key.value: count for key, count in counters.closed.items()}
    body["rejected"] = {key.value: count for key, count in counters.rejected.items()}
    body["stops"] = {key.value: count for key, count in counters.stops.items()}
    body["connection_durations"] = [
        counters.connection_durations.counts,
        counters.connection_durations.total,
    ]
    body["stop_durations"] = [counters.stop_durations.counts, counters.stop_durations.total]
    return REPLY + json.dumps(body, separators=(",", ":")).encode()


def decode(packet: bytes) -> Snapshot:
    """A snapshot from a reply packet; ValueError if it is not one."""
    if not packet.startswith(REPLY):
        raise ValueError("not a statistics reply")
    try:
        body = json.loads(packet[len(REPLY) :])
        counters = Counters()
        # Reasons this side does not know (a newer worker during an upgrade)
        # are left out rather than invented as labels.
        for reason in CloseReason:
            counters.closed[reason] = int(body["closed"].get(reason.value, 0))
        for why in RejectReason:
            counters.rejected[why] = int(body["rejected"].get(why.value, 0))
        for outcome in StopOutcome:
            counters.stops[outcome] = int(body["stops"].get(outcome.value, 0))
        counters.connection_durations = _histogram(
            counters.connection_durations, body["connection_durations"]
        )
        counters.stop_durations = _histogram(counters.stop_durations, body["stop_durations"])
        plain = {name: int(body.get(name, 0)) for name in _INT_FIELDS}
        return Snapshot(_statistics(plain, counters), int(body["threads"]))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed statistics reply: {exc}") from None


class WorkerStatistics:
    """The supervisor's record: each live worker's latest snapshot, the retired sum, restarts.

    The supervisor's main loop writes; the metrics thread reads. One lock
    covers both; nothing is done under it but dictionary updates and sums.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, Snapshot] = {}
        self._retired = Snapshot()
        self._restarts = dict.fromkeys(RestartReason, 0)
        self._workers = 0

    def update(self, pid: int, snapshot: Snapshot) -> None:
        with self._lock:
            self._live[pid] = snapshot

    def retire(self, pid: int) -> None:
        """Worker ``pid`` is gone: its last snapshot moves into the retired sum."""
        with self._lock:
            last = self._live.pop(pid, None)
            if last is not None:
                self._retired = self._retired + last.retired()

    def restarted(self, reason: RestartReason) -> None:
        with self._lock:
            self._restarts[reason] += 1

    def set_workers(self, count: int) -> None:
        with self._lock:
            self._workers = count

    def total(self) -> Snapshot:
        """Retired plus every live worker's latest snapshot."""
        with self._lock:
            total = self._retired
            for snapshot in self._live.values():
                total = total + snapshot
            return total

    def restarts(self) -> dict[RestartReason, int]:
        with self._lock:
            return dict(self._restarts)

    @property
    def workers(self) -> int:
        """Worker processes serving now (ready and not stopping)."""
        return self._workers


def _statistics(plain: dict[str, Any], counters: Counters) -> ServerStatistics:
    statistics = ServerStatistics(
        connections_active=0,
        connections_accepted=0,
        connections_closed=0,
        bytes_received=0,
        bytes_sent=0,
        connections_rejected=0,
        handler_errors=0,
        accept_errors=0,
        counters=counters,
    )
    # By name, so a field added to ServerStatistics travels without a change here.
    return replace(statistics, **plain)


def _add_counters(a: Counters, b: Counters) -> Counters:
    return Counters(
        {key: count + b.closed[key] for key, count in a.closed.items()},
        {key: count + b.rejected[key] for key, count in a.rejected.items()},
        {key: count + b.stops[key] for key, count in a.stops.items()},
        _add_histograms(a.connection_durations, b.connection_durations),
        _add_histograms(a.stop_durations, b.stop_durations),
    )


def _add_histograms(a: Histogram, b: Histogram) -> Histogram:
    return Histogram(
        a.bounds, [x + y for x, y in zip(a.counts, b.counts, strict=True)], a.total + b.total
    )


def _histogram(empty: Histogram, wire: Any) -> Histogram:
    counts, total = wire
    counts = [int(count) for count in counts]
    if len(counts) != len(empty.counts):
        raise TypeError("histogram buckets differ")
    return Histogram(empty.bounds, counts, float(total))
