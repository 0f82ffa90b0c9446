"""Prometheus metrics: the optional side (``pip install 'threadserve[metrics]'``).

A pull model. The server already counts what the metrics report: plain
integers changed once per connection (accepted, closed by reason, refused by
reason, errors), byte counters each connection keeps for itself, and the two
histograms of _events.py. ``ServerCollector`` reads ``Server.statistics()``
when Prometheus scrapes and turns the snapshot into metric families. So
metrics add nothing to the per-message path, not even a lock; and a server
nobody scrapes pays nothing at all. (prometheus-client's own ``Counter``
objects would take a lock on every ``inc()``.)

Metrics, all prefixed ``threadserve_``:

=====================================  =========  ==========================================
connections_active                     gauge      connections being served now
connections_accepted_total             counter    clients admitted (given a thread)
connections_closed_total{reason}       counter    connections ended, by CloseReason
connections_rejected_total{reason}     counter    clients turned away, by RejectReason
bytes_received_total                   counter    bytes read from clients
bytes_sent_total                       counter    bytes written to clients
handler_errors_total                   counter    exceptions out of the handler
accept_errors_total                    counter    accept() failures (EMFILE...), no thread
connection_duration_seconds            histogram  how long connections lasted
threads                                gauge      threads in this process
stops_total{outcome}                   counter    stops, clean or forced
stop_duration_seconds                  histogram  how long stops took
proxy_rejected_total                   counter    bad, late or untrusted PROXY headers
workers                                gauge      worker processes serving (with workers)
worker_restarts_total{reason}          counter    workers replaced, by RestartReason
=====================================  =========  ==========================================

Every label value comes from an enum (_events.py, _workerstats.py): a
fixed, small set.

With ``--workers`` the supervisor serves the metrics (``SupervisorCollector``):
at scrape time it asks every worker for its statistics and reports their
sums, plus what the workers gone before had counted (see _workerstats.py):
counters do not go back when a worker is replaced, and ``threads`` is the
workers' threads. Each worker's stop counts in ``stops_total`` (a reload
stops the old workers). The ``process_*`` and ``python_*`` metrics of the
default registry are the supervisor's own. An upgrade (SIGUSR2) hands over
to a new supervisor whose counts start at zero: Prometheus sees a counter
reset, which ``rate()`` and ``increase()`` take in their stride.

This module imports ``prometheus_client``; nothing in the core imports it
unless a server is given ``metrics=``.
"""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector, CollectorRegistry

from ._events import Histogram
from ._exceptions import BindError, ConfigurationError
from ._listeners import open_listeners, parse_bind_address
from ._server import ServerStatistics

if TYPE_CHECKING:
    from ._server import Server
    from ._supervisor import Supervisor

PREFIX = "threadserve_"


class ServerCollector(Collector):
    """Reads one server's statistics at scrape time (see the module docstring)."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        return statistics_families(self._server.statistics(), threading.active_count())


class SupervisorCollector(Collector):
    """Sums over a supervisor's workers, at scrape time (see the module docstring)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        total = self._supervisor.collect()
        yield from statistics_families(total.statistics, total.threads)
        record = self._supervisor.statistics
        yield _gauge("workers", "Worker processes serving now.", record.workers)
        restarts = CounterMetricFamily(
            PREFIX + "worker_restarts",
            "Worker processes replaced by the supervisor, by reason.",
            labels=["reason"],
        )
        for reason, count in record.restarts().items():
            restarts.add_metric([reason.value], count)
        yield restarts


def statistics_families(stats: ServerStatistics, threads: int) -> Iterator[Metric]:
    """The metric families of one server's statistics, or of a sum over workers."""
    counters = stats.counters
    yield _gauge("connections_active", "Connections being served now.", stats.connections_active)
    yield _counter(
        "connections_accepted",
        "Clients admitted and given a thread.",
        stats.connections_accepted,
    )
    closed = CounterMetricFamily(
        PREFIX + "connections_closed", "Connections that ended, by reason.", labels=["reason"]
    )
    for reason, count in counters.closed.items():
        closed.add_metric([reason.value], count)
    yield closed
    rejected = CounterMetricFamily(
        PREFIX + "connections_rejected",
        "Clients turned away without a thread, by reason.",
        labels=["reason"],
    )
    for why, count in counters.rejected.items():
        rejected.add_metric([why.value], count)
    yield rejected
    yield _counter("bytes_received", "Bytes read from clients.", stats.bytes_received)
    yield _counter("bytes_sent", "Bytes written to clients.", stats.bytes_sent)
    yield _counter(
        "handler_errors", "Unexpected exceptions raised by the handler.", stats.handler_errors
    )
    yield _counter(
        "accept_errors",
        "accept() failures for want of a resource (descriptors, memory, threads).",
        stats.accept_errors,
    )
    yield _histogram(
        "connection_duration_seconds",
        "How long connections lasted, from accept to close.",
        counters.connection_durations,
    )
    yield _gauge("threads", "Threads serving: this process's, or all workers'.", threads)
    stops = CounterMetricFamily(PREFIX + "stops", "Server stops, by outcome.", labels=["outcome"])
    for outcome, count in counters.stops.items():
        stops.add_metric([outcome.value], count)
    yield stops
    yield _histogram(
        "stop_duration_seconds",
        "How long stops took, from the request to the last connection closed.",
        counters.stop_durations,
    )
    yield _counter(
        "proxy_rejected",
        "Connections closed for a bad, late or untrusted PROXY header.",
        stats.proxy_rejected,
    )


def register(server: Server, registry: CollectorRegistry) -> ServerCollector:
    """Register a collector for ``server`` with ``registry``; returns it (to unregister)."""
    collector = ServerCollector(server)
    registry.register(collector)
    return collector


class MetricsEndpoint:
    """``/metrics`` over HTTP, prometheus-client's WSGI app on a daemon thread.

    The socket is bound here (a bad or busy address fails at once) or
    given (``sock``: inherited by an upgrade's new supervisor); serving
    starts with ``start()``, at once unless ``start=False``. Its own socket
    rather than prometheus-client's ``start_http_server``, which binds
    itself, so that a supervisor can hand the same socket over on SIGUSR2
    and scrapes never meet a refused port.
    """

    def __init__(
        self,
        address: str,
        registry: CollectorRegistry,
        *,
        sock: socket.socket | None = None,
        start: bool = True,
    ) -> None:
        host, sep, port = address.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit():
            raise ConfigurationError(
                f"--metrics {address!r}: use HOST:PORT or [IPV6]:PORT (port 0 for any free one)"
            )
        if sock is None:
            sock = _bind(address)
        self._httpd = _HTTPServer(sock, make_wsgi_app(registry))
        self._thread: threading.Thread | None = None
        self._closed = False
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{sock.getsockname()[1]}/metrics"
        if start:
            self.start()

    def fileno(self) -> int:
        """The listening descriptor (to hand over to a new supervisor)."""
        return self._httpd.socket.fileno()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, name="threadserve metrics", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop serving and close this process's descriptor of the socket (once)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._httpd.shutdown()  # Waits for serve_forever: only when it runs.
            self._thread.join(5.0)
        self._httpd.server_close()


class _SilentHandler(WSGIRequestHandler):
    """Logs no line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HTTPServer(ThreadingMixIn, WSGIServer):
    """A thread per scrape, on a socket bound beforehand (see MetricsEndpoint)."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, app: Any) -> None:
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], _SilentHandler, bind_and_activate=False)
        self.socket.close()  # The one socketserver made; ours is already listening.
        self.socket = sock
        self.server_address = sock.getsockname()
        # What server_bind would have set, without its reverse DNS lookup.
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.setup_environ()
        self.set_app(app)


def _bind(address: str) -> socket.socket:
    """One listening socket for ``address``, bound as the server's own listeners are."""
    try:
        listeners = open_listeners([parse_bind_address(address)])
    except (BindError, ConfigurationError) as exc:
        raise ConfigurationError(f"--metrics {address!r}: {exc}") from None
    # A name such as localhost may give one socket per family: one is enough here.
    for extra in listeners[1:]:
        extra.close()
    return listeners[0].socket


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, documentation, value=value)


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [
        ("+Inf" if math.isinf(bound) else repr(bound), count)
        for bound, count in histogram.cumulative()
    ]
    return HistogramMetricFamily(
        PREFIX + name, documentation, buckets=buckets, sum_value=histogram.total
    )
