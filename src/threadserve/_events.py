"""What happened to connections and stops, as a small fixed vocabulary, and its counters.

Closing reasons, refusals and stop outcomes are enums rather than free text
so that logs (``reason`` in ``--log-format json``) and metrics labels
(``threadserve_connections_closed_total{reason=...}``) take one of a few known
values: a label with free text in it (a peer address, an errno message) would
make a new time series per value. The human-readable detail stays in the text
log line.

``Counters`` holds what the server counts besides its plain integers: counts
per reason and two histograms. The server changes it under its own lock, once
per connection or stop (never per message), and ``Server.statistics()`` hands
out a copy; the Prometheus collector (_metrics.py) reads that copy at scrape
time, so nothing is computed for metrics nobody scrapes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from enum import Enum


class CloseReason(Enum):
    """Why a connection ended."""

    #: The handler returned (the client closed, or the protocol was done).
    COMPLETED = "completed"
    #: The handler returned during a server stop (drained, told goodbye).
    STOPPED = "stopped"
    #: The client went away: reset, broken pipe, unreachable.
    RESET = "reset"
    READ_TIMEOUT = "read_timeout"
    WRITE_TIMEOUT = "write_timeout"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    #: Any other deadline: idle, lifetime.
    TIMEOUT = "timeout"
    #: A line or frame over the handler's limit.
    TOO_LARGE = "too_large"
    #: The stream ended in the middle of a frame.
    INCOMPLETE = "incomplete"
    TLS_ERROR = "tls_error"
    #: The handler raised something unexpected (counted in handler errors too).
    HANDLER_ERROR = "handler_error"
    #: No thread could be started for it.
    NO_THREAD = "no_thread"
    #: A PROXY protocol header that was malformed, late or from an untrusted address.
    PROXY_ERROR = "proxy_error"
    #: Turned away after its PROXY header named a client over its per-address limit.
    REFUSED = "refused"

    # Counted in a dict once per connection. Enum's own __hash__ is Python
    # code (it hashes the member's name), about 0.25 µs a call; members are
    # singletons compared by identity, so the identity hash is as good.
    __hash__ = object.__hash__


class RejectReason(Enum):
    """Why a client was turned away without a thread."""

    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"
    #: Still in the listen queue when the server stopped: told, never served.
    STOPPING = "stopping"


class StopOutcome(Enum):
    """How a stop ended."""

    CLEAN = "clean"
    FORCED = "forced"


#: Connection lifetimes, seconds: from a quick request to a long-lived session.
CONNECTION_DURATION_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
    3600.0,
)
#: Stop durations, seconds: the grace period is 5 s by default.
STOP_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """Counts per upper bound (not cumulative), plus the sum: what one ``observe`` costs is
    a binary search over a dozen bounds and two adds."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)  # The last one is +Inf.

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or under it), ending with (inf, count)."""
        running = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total)


@dataclass
class Counters:
    """Per-reason counts and histograms; the server changes them under its lock."""

    closed: dict[CloseReason, int] = field(default_factory=lambda: dict.fromkeys(CloseReason, 0))
    rejected: dict[RejectReason, int] = field(
        default_factory=lambda: dict.fromkeys(RejectReason, 0)
    )
    stops: dict[StopOutcome, int] = field(default_factory=lambda: dict.fromkeys(StopOutcome, 0))
    connection_durations: Histogram = field(
        default_factory=lambda: Histogram(CONNECTION_DURATION_BUCKETS)
    )
    stop_durations: Histogram = field(default_factory=lambda: Histogram(STOP_DURATION_BUCKETS))

    def copy(self) -> Counters:
        return Counters(
            dict(self.closed),
            dict(self.rejected),
            dict(self.stops),
            self.connection_durations.copy(),
            self.stop_durations.copy(),
        )
