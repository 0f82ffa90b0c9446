"""The server: accept loop, connection registry, and the stop sequence.

Theory of operation
===================

One thread (the *serving thread*: whoever calls ``serve_forever``, usually
the main thread) waits in ``select`` on the listening sockets and on a
*control pipe*. Each accepted client gets its own daemon thread running the
handler with a ``Connection``; the registry of live connections is a dict the
connection thread removes itself from in ``finally``, so it prunes itself.

Nothing polls on a timer. Everything that must reach the serving thread (a
stop request from a signal handler or another thread, a force request, "the
last connection just finished") writes one byte to the control pipe. Writing
to a pipe takes no lock, which is what makes it safe from a signal handler
that may have interrupted code holding one.

Stopping (``stop()``, SIGINT, SIGTERM) runs in the serving thread:

1. Clients still in the listen queue are accepted and told (notice, FIN);
   then the listeners close: a new connect is refused.
2. The *stop descriptors* become readable (eventfds, or pipes where there
   are none, one per group of connections, woken a group at a time: see
   _broadcast.py). Every
   connection polls its group's descriptor next to its socket, so a blocked
   reader wakes; it then gets what had already arrived, then end-of-stream.
   Every cancel token is set (handlers doing non-socket work can see it or
   run a hook; hooks run on a thread of their own, so one that blocks cannot
   hold up the stop).
3. Handlers finish the work they had read and return; the connection thread
   writes the goodbye notice, sends FIN and lingers until the client's EOF.
4. The serving thread waits, in ``poll`` on the control pipe, until the
   registry is empty or the grace deadline passes or a second signal
   arrives. Whatever is left is forced: ``shutdown(SHUT_RDWR)`` wakes any
   socket call. Threads that still do not end (stuck in a call that ignores
   the token) are logged with their stack; as daemon threads they do not keep
   the process alive.

Shared state is changed under ``_lock``; socket I/O happens outside it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import select
import selectors
import socket
import ssl
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _connection as _connection_module
from . import _setup
from ._admission import Admission, OverloadPolicy
from ._agent import AgentResponder
from ._broadcast import MAX_GROUPS, StopBroadcast
from ._cancel import CallbackRunner, CancelCallback
from ._connection import DEFAULT_CHUNK_SIZE, PEER_GONE_ERRNOS, Connection, queued_bytes
from ._events import CloseReason, Counters, RejectReason, StopOutcome
from ._exceptions import (
    ConfigurationError,
    ConnectionTimeout,
    FrameTooLarge,
    HandshakeTimeout,
    IncompleteRead,
    ProxyProtocolError,
    ReadTimeout,
    WriteTimeout,
)
from ._gil import threads_changed
from ._keepalive import keepalive_options
from ._listeners import (
    LISTEN_BACKLOG,
    Listener,
    format_address,
    open_listeners,
    parse_bind_address,
)
from ._notices import Notices
from ._proxy import ProxyMode
from ._ratelimit import RateLimitedLog
from ._threads import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_IDLE, ParkingThreads
from ._timeouts import Timeouts

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

logger = logging.getLogger("threadserve")

Handler = Callable[[Connection], object]

DEFAULT_BIND = "127.0.0.1:8000"
DEFAULT_GRACE = 5.0
DEFAULT_GOODBYE = b"Shutting down!\n"
DEFAULT_LINGER = 2.0
#: After forcing, how long stuck threads get to notice before they are reported.
FORCE_MARGIN = 0.25
#: At stop, wake the next group of connections once fewer than this many of
#: those already woken are still finishing (see _broadcast.py).
STOP_WAVE = 128
#: Accept at most this many clients per wake-up, so the control pipe is heard promptly.
ACCEPT_BATCH = 64
#: accept() failures that mean "out of a resource": back off instead of spinning.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: The longest grace or linger accepted: a day. Larger values (inf included)
#: overflow select()'s timeout and mean "never stop", which --grace is not for.
MAX_SECONDS = 86400.0
ACCEPT_BACKOFF_FIRST = 0.005
ACCEPT_BACKOFF_MAX = 1.0
#: TCP keepalive: probe after 60 s of silence, every 10 s, give up after 3
#: unanswered probes. A client that vanished (power loss, cable, NAT timeout)
#: frees its thread after about 90 s instead of never.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES = 60, 10, 3

_current = threading.local()


@dataclass(frozen=True)
class StopReport:
    """How a stop went. ``clean`` is False when anything had to be forced."""

    clean: bool
    drained: int
    forced: int
    stuck_threads: tuple[str, ...]
    duration: float


@dataclass(frozen=True)
class ServerStatistics:
    """A snapshot of the server's counters."""

    connections_active: int
    connections_accepted: int
    connections_closed: int
    bytes_received: int
    bytes_sent: int
    connections_rejected: int
    handler_errors: int
    accept_errors: int
    #: Counts per closing reason, refusal and stop outcome, and the duration histograms.
    counters: Counters = field(default_factory=Counters)
    #: Connections closed for a bad, late or untrusted PROXY header (handler never ran).
    proxy_rejected: int = 0
    #: Connection threads started, connections handed to a parked thread
    #: instead, and threads parked right now (see _threads.py).
    threads_started: int = 0
    threads_reused: int = 0
    threads_idle: int = 0


class Server:
    """A thread-per-connection TCP (and Unix socket) server.

    ``handler`` is any callable taking a :class:`Connection`. Binding happens
    here, all addresses or none, so ``addresses`` is known at once (port 0
    included) and a bad address fails before anything runs.

    Resource handling: the server owns every connection and closes it after
    its handler returns, whatever the handler did. ``stop()`` (or leaving the
    ``with`` block) closes the listeners and the internal pipes.

    Error handling: exceptions from a handler are logged with the peer address
    and never stop the server. Connection resets, timeouts and limits are
    expected: they only give the reason in the INFO "connection closed" line.
    Anything else is logged with its traceback at ERROR and counted in
    ``statistics().handler_errors``.
    """

    def __init__(
        self,
        handler: Handler,
        bind: str | Sequence[str | Listener] = DEFAULT_BIND,
        *,
        grace: float = DEFAULT_GRACE,
        goodbye: bytes | str | None = DEFAULT_GOODBYE,
        linger: float = DEFAULT_LINGER,
        timeouts: Timeouts | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_connections: int | None = None,
        max_connections_per_ip: int | None = None,
        overload: OverloadPolicy | str = OverloadPolicy.WAIT,
        notices: Notices | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive: bool = True,
        handle_signals: bool = True,
        on_serving: Callable[[], object] | None = None,
        on_stop_accepting: Callable[[], object] | None = None,
        proxy_protocol: ProxyMode | str | None = None,
        proxy_allow: Sequence[str] | None = None,
        proxy_timeout: float = _setup.DEFAULT_PROXY_TIMEOUT,
        agent_bind: str | None = None,
        drain_delay: float = 0.0,
        metrics: CollectorRegistry | None = None,
        idle_threads: int = DEFAULT_MAX_IDLE,
        idle_thread_timeout: float = DEFAULT_IDLE_TIMEOUT,
        adapt_switch_interval: bool = True,
    ) -> None:
        if not callable(handler):
            raise ConfigurationError(f"handler {handler!r} is not callable")
        _check_seconds("grace", grace)
        _check_seconds("linger", linger)
        _check_seconds("drain_delay", drain_delay)
        _check_seconds("idle_thread_timeout", idle_thread_timeout)
        if isinstance(idle_threads, bool) or not isinstance(idle_threads, int) or idle_threads < 0:
            raise ConfigurationError(
                f"idle_threads={idle_threads!r}: must be a count of threads, 0 or more"
            )
        if chunk_size <= 0:
            raise ConfigurationError(f"chunk_size={chunk_size!r}: must be a positive byte count")
        self.handler = handler
        self.grace = float(grace)
        self.goodbye = goodbye.encode() if isinstance(goodbye, str) else (goodbye or None)
        self.linger = float(linger)
        self.timeouts = timeouts if timeouts is not None else Timeouts()
        self.chunk_size = chunk_size
        self.notices = notices if notices is not None else Notices()
        self.tls = tls
        self.handle_signals = handle_signals
        # Called in the serving thread once it serves, signal handlers in
        # place, and once the stop has closed the listeners (a worker tells
        # its supervisor; systemd is told READY=1, then STOPPING=1).
        self.on_serving = on_serving
        self.on_stop_accepting = on_stop_accepting
        self._admission = Admission(max_connections, max_connections_per_ip, overload)
        # Behind a load balancer: the PROXY header, then TLS (see _setup.py).
        self._proxy = _setup.ProxySettings.from_options(proxy_protocol, proxy_allow, proxy_timeout)
        self._setup_steps = _setup.SetupSteps(self._proxy, tls, self._readmit)
        # On a stop request, keep serving this long while the agent says
        # "drain", so the load balancer moves new clients elsewhere first.
        self.drain_delay = float(drain_delay)
        self._drain_until: float | None = None
        self._agent: AgentResponder | None = None

        specs = [bind] if isinstance(bind, str) else list(bind)
        self._listeners: list[Listener] = open_listeners(
            [s if isinstance(s, Listener) else parse_bind_address(s) for s in specs]
        )
        try:
            for listener in self._listeners:
                _tune_listener(listener.socket, keepalive)
            self._control_r, self._control_w = _nonblocking_pipe()
            self._broadcast = StopBroadcast()
            if agent_bind is not None:
                self._agent = AgentResponder(agent_bind)
        except BaseException:
            for listener in self._listeners:
                listener.close()
            for fd in getattr(self, "_control_r", -1), getattr(self, "_control_w", -1):
                if fd >= 0:
                    os.close(fd)
            raise
        self.addresses: list[str] = [listener.address for listener in self._listeners]

        self._lock = threading.Lock()
        # Live connections and the thread serving each (None until a thread
        # picks the connection up: see _run_connection).
        self._connections: dict[Connection, threading.Thread | None] = {}
        # Raise sys.setswitchinterval with the number of connections, so
        # thousands of GIL waiters cannot start a convoy (see _gil.py).
        self._adapt_switch_interval = adapt_switch_interval
        # Connection threads park between connections (see _threads.py).
        self._threads: ParkingThreads[Connection] = ParkingThreads(
            self._run_connection, max_idle=idle_threads, idle_timeout=idle_thread_timeout
        )
        self._group_live = [0] * MAX_GROUPS  # Live connections per stop group.
        # During a stop, a connection thread wakes the serving thread once the
        # live count falls to this (-1: only when the last one ends).
        self._wake_at_live = -1
        # Set without the lock (a signal handler may set them); read by the serving thread.
        self._stop_requested = False
        self._force_requested = False
        self._stopping = False
        # Busy connections watch this; idle ones wait for their wave (_connection.py).
        self._stop_begun = threading.Event()
        self._stop_deadline = 0.0
        self._serving_started = False
        self._serving_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._report: StopReport | None = None
        self._background: threading.Thread | None = None
        # Threads that left the registry but may not have returned yet.
        self._finishing: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._spawn_queue: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        self._accept_paused = False  # At max_connections under the wait policy.
        self._accept_handed_over = False  # pause_accepting() was called.
        self._rejections_log = RateLimitedLog(logger, logging.WARNING)
        self._accept_errors_log = RateLimitedLog(logger, logging.ERROR)
        self._proxy_log = RateLimitedLog(logger, logging.WARNING)
        self._proxy_rejected = 0
        # Counters; closed-connection totals are folded in under the lock.
        self._accepted = 0
        self._closed = 0
        self._closed_bytes_in = 0
        self._closed_bytes_out = 0
        self._handler_errors = 0
        self._accept_errors = 0
        self._rejected = 0
        self._counters = Counters()  # Per reason, and histograms (see _events.py).
        # Listen-queue clients told of the stop, their FIN sent, waiting for
        # their EOF (by descriptor), and when to stop waiting for them.
        self._dismissed: dict[int, socket.socket] = {}
        self._dismissed_until = 0.0
        # Cancel hooks run here at stop, off the stopping thread (see _cancel.py).
        self._hook_runner = CallbackRunner("threadserve cancel hooks")
        if metrics is not None:
            # A collector that reads statistics() at scrape time (_metrics.py):
            # nothing is added to the per-message path.
            try:
                from ._metrics import register
            except ImportError as exc:
                self._release_resources()
                raise ConfigurationError(
                    f"metrics= needs prometheus-client: pip install 'threadserve[metrics]' ({exc})"
                ) from None
            register(self, metrics)

    # ------------------------------------------------------------------ public API

    def serve_forever(self) -> StopReport:
        """Serve until stopped, then run the stop sequence and return its report.

        In the main thread (and with ``handle_signals``), SIGINT and SIGTERM
        start a graceful stop and a second one forces it.
        """
        self._claim_serving()
        return self._serve()

    def start(self) -> Server:
        """Serve in a background thread (for tests and embedding); returns self."""
        self._claim_serving()
        self._background = threading.Thread(
            target=self._serve, name=f"threadserve server {self.addresses[0]}", daemon=True
        )
        self._background.start()
        return self

    def _claim_serving(self) -> None:
        with self._lock:
            if self._serving_started:
                raise RuntimeError("a Server serves once: serve_forever() or start() was called")
            self._serving_started = True

    def _serve(self) -> StopReport:
        self._serving_thread = threading.current_thread()
        spawner = threading.Thread(
            target=self._spawn_connection_threads, name="threadserve server spawner", daemon=True
        )
        spawner.start()
        if self._agent is not None:
            self._agent.start()
        try:
            with self._signal_handling():
                logger.info("serving on %s", ", ".join(self.addresses), extra={"event": "serving"})
                self._call_hook(self.on_serving)
                try:
                    self._accept_until_stop_requested()
                except BaseException:
                    # KeyboardInterrupt without our signal handlers, or a bug:
                    # still end every connection before letting it propagate.
                    self._request_force()
                    self._stop_sequence()
                    raise
                report = self._stop_sequence()
        finally:
            self._spawn_queue.put(None)
            spawner.join(FORCE_MARGIN)
            self._release_resources()
            self._stopped.set()
        return report

    def stop(self, grace: float | None = None) -> StopReport | None:
        """Stop gracefully, within ``grace`` seconds (default: the server's), then force.

        Safe from any thread and idempotent. It waits for the stop to finish
        and returns the report, except when called from a handler (which the
        stop itself waits for) or from the serving thread: then it only asks
        and returns None.
        """
        if self._stopped.is_set():
            return self._report
        if grace is not None:
            _check_seconds("grace", grace)
            self.grace = float(grace)
            if grace == 0:
                self._force_requested = True
        self._request_stop()
        with self._lock:
            never_served = not self._serving_started
            if never_served:
                self._serving_started = True  # serve_forever() may not start after this.
        if never_served:
            self._release_resources()
            self._report = StopReport(True, 0, 0, (), 0.0)
            self._stopped.set()
            return self._report
        if (
            getattr(_current, "server", None) is self
            or threading.current_thread() is self._serving_thread
        ):
            return None
        self._stopped.wait()
        return self._report

    def statistics(self) -> ServerStatistics:
        with self._lock:
            live = list(self._connections)
            bytes_in = self._closed_bytes_in + sum(c.bytes_received for c in live)
            bytes_out = self._closed_bytes_out + sum(c.bytes_sent for c in live)
            return ServerStatistics(
                connections_active=len(live),
                connections_accepted=self._accepted,
                connections_closed=self._closed,
                connections_rejected=self._rejected,
                bytes_received=bytes_in,
                bytes_sent=bytes_out,
                handler_errors=self._handler_errors,
                accept_errors=self._accept_errors,
                counters=self._counters.copy(),
                proxy_rejected=self._proxy_rejected,
                threads_started=self._threads.started,
                threads_reused=self._threads.reused,
                threads_idle=self._threads.idle,
            )

    @property
    def max_connections(self) -> int:
        return self._admission.max_connections

    @property
    def agent_address(self) -> str | None:
        """Where the HAProxy agent check is answered (``agent_bind``, port 0 resolved)."""
        return None if self._agent is None else self._agent.addresses[0]

    @property
    def draining(self) -> bool:
        """True while a stop waits out its drain delay (the agent answers ``drain``)."""
        return self._drain_until is not None and not self._stopping

    def connections(self) -> list[Connection]:
        """The live connections right now (a copy)."""
        with self._lock:
            return list(self._connections)

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    def pause_accepting(self) -> None:
        """Take no more clients from the listeners, but go on serving the connections there are.

        For a worker about to hand its shared listening socket over to the
        others (see _supervisor.py): clients it accepted a moment ago still
        get their request answered before the stop, and new ones wait in
        the kernel's queue for the other workers. Safe from any thread.
        """
        self._accept_handed_over = True
        self._wake()

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        if self._stopped.is_set():
            state = "stopped"
        elif self._stop_requested:
            state = "stopping"
        elif self._serving_started:
            state = "serving"
        else:
            state = "bound"
        return (
            f"<Server {state} on {', '.join(self.addresses)} connections={len(self._connections)}>"
        )

    # ------------------------------------------------------------------ accepting

    def _accept_until_stop_requested(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            selector.register(self._control_r, selectors.EVENT_READ)
            listening = False
            backoff = 0.0
            while self._keep_accepting():
                with self._lock:
                    # Under the lock, so a connection ending right now sees the
                    # flag and wakes us (see _unregister): no lost wake-up.
                    self._update_accept_paused()
                if listening == self._accept_paused:
                    listening = not listening
                    for listener in self._listeners:
                        if listening:
                            selector.register(listener.socket, selectors.EVENT_READ, listener)
                        else:
                            selector.unregister(listener.socket)
                for key, _events in selector.select(self._accept_wait(backoff)):
                    if key.data is None:
                        _drain(self._control_r)
                    elif self._accept_batch(key.data):
                        backoff = 0.0
                    else:
                        backoff = min(max(backoff * 2, ACCEPT_BACKOFF_FIRST), ACCEPT_BACKOFF_MAX)
                if backoff:
                    # Out of descriptors or memory: stop listening for a while
                    # (only the control pipe wakes us) instead of spinning.
                    # Go's net/http backs off the same way, 5 ms doubling to 1 s.
                    self._wait_control(backoff)
        finally:
            selector.close()

    def _keep_accepting(self) -> bool:
        """True until a stop is requested, and then for the drain delay (unless forced).

        During the delay the agent answers ``drain``: the load balancer sends
        no new clients, the ones already on their way are served as usual.
        """
        if not self._stop_requested:
            return True
        if self._force_requested or not self.drain_delay:
            return False
        now = time.monotonic()
        if self._drain_until is None:
            self._drain_until = now + self.drain_delay
            if self._agent is not None:
                self._agent.drain()
            logger.info(
                "stop requested: draining for %.1f s before stopping (still serving)",
                self.drain_delay,
            )
        return now < self._drain_until

    def _accept_wait(self, backoff: float) -> float | None:
        """How long the accept loop may sleep: the back-off, and no later than the drain's end."""
        if self._drain_until is None:
            return backoff or None
        remaining = max(0.0, self._drain_until - time.monotonic())
        return min(backoff, remaining) if backoff else remaining

    def _update_accept_paused(self) -> None:
        """Pause accepting at max_connections under the wait policy; the caller holds the lock."""
        self._accept_paused = self._accept_handed_over or (
            self._admission.policy is OverloadPolicy.WAIT and self._admission.full
        )

    def _accept_batch(self, listener: Listener) -> bool:
        """Accept what is waiting; False if accept failed for lack of a resource."""
        for _ in range(ACCEPT_BATCH):
            if self._accept_paused:
                return True
            try:
                sock, address = listener.socket.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    with self._lock:
                        self._accept_errors += 1
                    self._accept_errors_log.emit(
                        "accept on %s failed: %s; pausing accepts (backing off)",
                        listener.address,
                        exc.strerror,
                    )
                    return False
                # ECONNABORTED and friends: that client is gone, the next one is not.
                logger.debug("accept on %s: %s", listener.address, exc)
                continue
            self._admit(sock, address)
        return True

    def _admit(self, sock: socket.socket, address: object) -> None:
        peer = format_address(sock.family, address)
        ip = address[0] if isinstance(address, tuple) else None
        if self._proxy is not None:
            if not self._proxy.allows(ip):
                self._reject_proxy(peer, "not in proxy_allow")
                sock.close()
                return
            # Every client of a proxy comes from its address: count them per
            # address once the header names them (_readmit).
            ip = None
        with self._lock:
            refusal = self._admission.admit(ip)
            if refusal is None:
                self._accepted += 1
            else:
                self._rejected += 1
                # Admission checks the total before the per-address limit.
                why = (
                    RejectReason.MAX_CONNECTIONS
                    if self._admission.full
                    else RejectReason.MAX_CONNECTIONS_PER_IP
                )
                self._counters.rejected[why] += 1
            self._update_accept_paused()
        if refusal is None:
            self._start_connection(sock, peer, ip)
        else:
            self._turn_away(sock, peer, refusal, why)

    def _reject_proxy(self, peer: str, reason: object) -> None:
        with self._lock:
            self._proxy_rejected += 1
        self._proxy_log.emit("PROXY protocol: closing %s: %s", peer, reason)

    def _readmit(self, conn: Connection, ip: str | None) -> str | None:
        """Count ``conn`` under the client its proxy reported; or say why that client is over."""
        with self._lock:
            refusal = self._admission.move(conn._client_ip, ip)
            if refusal is None:
                conn._client_ip = ip
            else:
                self._rejected += 1
                self._counters.rejected[RejectReason.MAX_CONNECTIONS_PER_IP] += 1
        if refusal is not None:
            self._rejections_log.emit("turning away %s: %s", conn.peer, refusal)
        return refusal

    def _turn_away(
        self,
        sock: socket.socket,
        peer: str,
        reason: str,
        why: RejectReason = RejectReason.MAX_CONNECTIONS,
    ) -> None:
        self._rejections_log.emit(
            "turning away %s: %s",
            peer,
            reason,
            extra={"event": "connection_rejected", "peer": peer, "reason": why.value},
        )
        _tell_and_close(sock, None if self.tls else self.notices.busy)

    def _start_connection(self, sock: socket.socket, peer: str, ip: str | None) -> None:
        sock.setblocking(False)
        group, stop_fd = self._broadcast.assign(len(self._connections))
        conn = Connection(
            sock,
            peer,
            stop_fd=stop_fd,
            timeouts=self.timeouts,
            chunk_size=self.chunk_size,
            client_ip=ip,
            stop_group=group,
            stop_begun=self._stop_begun,
        )
        with self._lock:
            self._connections[conn] = None
            self._group_live[group] += 1
        if self._adapt_switch_interval:
            threads_changed(+1)
        # A parked thread takes it at once (one wake-up, no thread start).
        if self._threads.hand_off(conn):
            return
        # Thread.start() waits until the new thread runs, ~0.1-0.5 ms. Done
        # here, it would hold up every client queued behind this one: a burst
        # that should be turned away at once would wait for hundreds of thread
        # starts. The spawner thread starts them instead.
        self._spawn_queue.put(conn)

    def _spawn_connection_threads(self) -> None:
        while (conn := self._spawn_queue.get()) is not None:
            self._start_thread(conn)
            # Do not keep the last connection alive while waiting for the next.
            del conn

    def _start_thread(self, conn: Connection) -> None:
        try:
            self._threads.start(conn, name=f"threadserve {conn.peer}")
        except RuntimeError as exc:  # "can't start new thread": out of threads or memory.
            self._accept_errors_log.emit(
                "cannot start a thread for %s: %s; closing it", conn.peer, exc
            )
            with self._lock:
                self._accept_errors += 1
            conn._close_socket()
            self._unregister(conn, "no thread", CloseReason.NO_THREAD)

    # ------------------------------------------------------------------ one connection

    def _run_connection(self, conn: Connection) -> None:
        thread = threading.current_thread()
        thread.name = f"threadserve {conn.peer}"  # A reused thread is renamed for its new peer.
        _current.server = self
        with self._lock:
            self._connections[conn] = thread
        if self._proxy is None:  # Else logged once the header names the client.
            logger.info(
                "connection opened: %s",
                conn.peer,
                extra={"event": "connection_opened", "peer": conn.peer},
            )
        outcome = "closed"
        reason = CloseReason.COMPLETED
        cutoff_notice: bytes | None = None
        abandon = False
        try:
            _setup.set_up(conn, self._setup_steps)  # PROXY header, then TLS handshake.
            if self._proxy is not None:
                thread.name = f"threadserve {conn.peer}"  # The client the proxy reported.
            self.handler(conn)
        except ProxyProtocolError as exc:
            # Malformed, truncated or late: the handler never runs. Close at
            # once; the proxy reads nothing from us.
            outcome, abandon = f"PROXY protocol: {exc}", True
            reason = CloseReason.PROXY_ERROR
            self._reject_proxy(conn.peer, exc)
        except _setup.Aborted as exc:
            # Stopping: the proxy (and its client) still hear the goodbye.
            outcome, abandon = str(exc), not exc.stopping
            reason = CloseReason.STOPPED if self._stopping else CloseReason.RESET
        except _setup.Refused as exc:
            outcome, cutoff_notice = str(exc), None if self.tls else self.notices.busy
            reason = CloseReason.REFUSED
        except FrameTooLarge as exc:
            outcome, cutoff_notice = str(exc), self.notices.too_large
            reason = CloseReason.TOO_LARGE
        except ReadTimeout as exc:
            outcome, cutoff_notice = str(exc), self.notices.timed_out
            reason = CloseReason.READ_TIMEOUT
        except (WriteTimeout, HandshakeTimeout) as exc:
            # The client reads nothing (or says nothing): a notice or a
            # lingering close would only hold the thread longer. Close at once.
            outcome, abandon = str(exc), True
            reason = (
                CloseReason.WRITE_TIMEOUT
                if isinstance(exc, WriteTimeout)
                else CloseReason.HANDSHAKE_TIMEOUT
            )
        except (ConnectionTimeout, IncompleteRead) as exc:
            outcome = str(exc)
            reason = (
                CloseReason.INCOMPLETE if isinstance(exc, IncompleteRead) else CloseReason.TIMEOUT
            )
        except ssl.SSLError as exc:
            outcome = f"TLS error: {exc.reason or exc}"
            reason = CloseReason.TLS_ERROR
            if not _raised_by_connection(exc):  # The handler's own TLS (a backend, say).
                self._count_handler_error(conn)
        except OSError as exc:
            outcome = exc.strerror or str(exc)
            reason = CloseReason.RESET
            # The client going away is expected; the same error from the
            # handler's own sockets (a database connection, say) is a bug to see.
            expected = exc.errno in PEER_GONE_ERRNOS or self._stopping
            if not (expected and _raised_by_connection(exc)):
                reason = CloseReason.HANDLER_ERROR
                self._count_handler_error(conn)
        except Exception:
            outcome = "handler error"
            reason = CloseReason.HANDLER_ERROR
            self._count_handler_error(conn)
        finally:
            if reason is CloseReason.COMPLETED and self._stopping:
                reason = CloseReason.STOPPED
            try:
                if abandon:
                    conn._close_socket()
                else:
                    self._finish_connection(conn, cutoff_notice)
            finally:
                self._unregister(conn, outcome, reason)

    def _count_handler_error(self, conn: Connection) -> None:
        with self._lock:
            self._handler_errors += 1
        logger.exception("handler failed for %s", conn.peer)

    def _finish_connection(self, conn: Connection, cutoff_notice: bytes | None) -> None:
        # Group members leave first; at stop, a member waits (up to the grace
        # deadline) for the others to finish reading, so that what they had
        # read reaches it before its notice. Then its linger starts.
        stopping = self._stopping
        conn._run_closing_hooks(
            self._stop_deadline - FORCE_MARGIN if stopping else time.monotonic() + self.linger
        )
        now = time.monotonic()
        linger_until = now + self.linger
        notice = cutoff_notice
        if self._stopping:
            if notice is None and not conn._peer_eof:
                notice = self.goodbye
            # Finish lingering just before the grace deadline, so a client
            # that never closes does not turn a clean drain into a forced one.
            linger_until = min(linger_until, self._stop_deadline - FORCE_MARGIN / 2)
        conn._close_gracefully(notice, linger_until)

    def _unregister(
        self, conn: Connection, outcome: str, reason: CloseReason = CloseReason.COMPLETED
    ) -> None:
        # Log first: the admission slot is freed below, and a thread still
        # busy after that is one more than max_connections allows.
        duration = time.monotonic() - conn.opened_at
        logger.info(
            "connection closed: %s after %.3f s, %d bytes in, %d bytes out (%s)",
            conn.peer,
            duration,
            conn.bytes_received,
            conn.bytes_sent,
            outcome,
            extra={
                "event": "connection_closed",
                "peer": conn.peer,
                "duration": duration,
                "bytes_in": conn.bytes_received,
                "bytes_out": conn.bytes_sent,
                "reason": reason.value,
            },
        )
        with self._lock:
            if getattr(_current, "server", None) is self:  # A connection thread, about to end.
                self._finishing.add(threading.current_thread())
            del self._connections[conn]
            self._group_live[conn._stop_group] -= 1
            if self._adapt_switch_interval:
                threads_changed(-1)
            self._admission.release(conn._client_ip)
            self._closed += 1
            self._closed_bytes_in += conn.bytes_received
            self._closed_bytes_out += conn.bytes_sent
            self._counters.closed[reason] += 1
            self._counters.connection_durations.observe(duration)
            wake = self._accept_paused
            if self._stopping:
                if len(self._connections) <= self._wake_at_live:
                    self._wake_at_live = -1  # One wake-up per wave is enough.
                    wake = True
                elif not self._connections:
                    wake = True
        if wake:
            self._wake()

    # ------------------------------------------------------------------ stopping

    def _request_stop(self) -> None:
        # Lock-free on purpose: this runs inside signal handlers.
        self._stop_requested = True
        self._wake()

    def _request_force(self) -> None:
        self._force_requested = True
        self._request_stop()

    def _call_hook(self, hook: Callable[[], object] | None) -> None:
        if hook is not None:
            try:
                hook()
            except Exception:
                logger.exception("callback %r failed", hook)

    def _wake(self) -> None:
        control = self._control_w
        if control < 0:
            return  # Stopped and released: nobody is listening any more.
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(control, b"\0")  # A full pipe already means "wake up".

    def _stop_sequence(self) -> StopReport:
        started = time.monotonic()
        self._stop_deadline = started + self.grace
        self._dismissed_until = min(started + self.linger, self._stop_deadline - FORCE_MARGIN / 2)
        # A queue that other processes go on serving (a supervisor's shared
        # listener) is not ours to dismiss: its clients are theirs. Ours stop
        # taking new clients first, so that none lands in the queue between
        # its emptying and the close (which would reset it).
        for listener in self._listeners:
            if listener.owns_queue:
                listener.refuse_new_clients()
        queued = sum(
            self._dismiss_listen_queue(listener)
            for listener in self._listeners
            if listener.owns_queue
        )
        for listener in self._listeners:
            listener.close()
        # No connection comes any more: parked threads end now, and threads
        # that finish from here on end instead of parking.
        self._threads.close()
        self._call_hook(self.on_stop_accepting)
        logger.info(
            "stopping: %d connections, grace %.1f s; %d waiting in the listen queue were told",
            len(self._connections),
            self.grace,
            queued,
            extra={"event": "stopping"},
        )
        with self._lock:
            self._stopping = True
            connections = dict(self._connections)
        # Only now: a connection that sees this must also see _stopping, or it
        # would close without the goodbye notice (_finish_connection).
        self._stop_begun.set()
        self._wake_in_waves(connections)
        self._wait_for_connections(self._stop_deadline)
        self._close_dismissed()
        with self._lock:
            # A connection still in its lingering close has had its notice and
            # FIN: cutting the linger short is not forcing it.
            lingering = [conn for conn in self._connections if conn._lingering]
            leftover = {c: t for c, t in self._connections.items() if not c._lingering}
        for conn in lingering:
            conn._force_close()
        stuck: list[str] = []
        if leftover:
            logger.warning(
                "%s: forcing %d connections: %s",
                "stop forced" if self._force_requested else "grace period over",
                len(leftover),
                ", ".join(c.peer for c in leftover),
            )
            for conn in leftover:
                conn._force_close()
            # Forced sockets wake their threads at once; give them a moment to end.
            self._wait_for_connections(time.monotonic() + FORCE_MARGIN, until_forced=False)
            stuck = self._report_stuck_threads(leftover)
        # A thread leaves the registry a few lines before it ends, and parked
        # threads (woken by _threads.close() above) have only their last lines
        # to run; wait for those, so no thread outlives the stop (stuck ones
        # aside). None of them is stuck, but on a loaded machine hundreds can
        # take longer than FORCE_MARGIN to get the GIL: they get until the
        # grace deadline, unless the stop was forced.
        hooks_deadline = time.monotonic() + FORCE_MARGIN
        join_deadline = hooks_deadline
        if not self._force_requested:
            join_deadline = max(join_deadline, self._stop_deadline)
        with self._lock:
            finishing = list(self._finishing)
        for thread in finishing:
            thread.join(max(0.0, join_deadline - time.monotonic()))
        stuck_hook = self._hook_runner.close(max(0.0, hooks_deadline - time.monotonic()))
        if stuck_hook is not None:
            stuck.append(_report_stuck_hook(*stuck_hook))
        duration = time.monotonic() - started
        report = StopReport(
            clean=not leftover,
            drained=len(connections) - len(leftover),
            forced=len(leftover),
            stuck_threads=tuple(stuck),
            duration=duration,
        )
        self._report = report
        outcome = StopOutcome.CLEAN if report.clean else StopOutcome.FORCED
        with self._lock:
            self._counters.stops[outcome] += 1
            self._counters.stop_durations.observe(duration)
        logger.info(
            "stopped in %.3f s: %d drained, %d forced",
            duration,
            report.drained,
            report.forced,
            extra={"event": "stopped", "duration": duration, "reason": outcome.value},
        )
        return report

    def _wake_in_waves(self, connections: dict[Connection, threading.Thread | None]) -> None:
        """Set every token and wake every reader, a group at a time (see _broadcast.py)."""
        by_group: dict[int, list[Connection]] = {}
        for conn in connections:
            by_group.setdefault(conn._stop_group, []).append(conn)
        unreleased = sorted(by_group)
        while unreleased:
            group = unreleased.pop(0)
            self._broadcast.release(group)
            for conn in by_group[group]:
                conn.cancel_token.cancel("server stopping", self._hook_runner)
            if unreleased and not self._wait_for_wave_room(unreleased):
                break  # Deadline or a forced stop: wake the rest at once.
        for group in unreleased:
            for conn in by_group[group]:
                conn.cancel_token.cancel("server stopping", self._hook_runner)
        self._broadcast.release_all()

    def _wait_for_wave_room(self, unreleased: list[int]) -> bool:
        """Wait until fewer than STOP_WAVE woken connections are still finishing."""

        def room_for_a_wave() -> bool:
            waiting = sum(self._group_live[group] for group in unreleased)
            if len(self._connections) - waiting < STOP_WAVE:
                return True
            # Not yet: have the connection threads wake us when there is.
            self._wake_at_live = waiting + STOP_WAVE // 2
            return False

        try:
            return self._wait_until(room_for_a_wave, self._stop_deadline)
        finally:
            with self._lock:
                self._wake_at_live = -1

    def _dismiss_listen_queue(self, listener: Listener) -> int:
        """Tell the clients still waiting in the listen queue, instead of resetting them.

        Closing a listener resets every connection the kernel had completed
        but we had not accepted yet. They were never served, so nothing they
        sent was read; they only need to know. Each gets the notice and a FIN,
        then a lingering close like a served connection's (see _wait_control):
        a client that sends just after being told must not turn our close
        into a reset that destroys the notice. Bounded by the backlog size.
        """
        dismissed = 0
        if listener.reuse_port:
            # Other sockets in its SO_REUSEPORT group stay open, and the
            # kernel goes on hashing new clients to this one until it closes:
            # those landing after our last accept would be reset. A backlog
            # of 0 leaves them waiting on their SYN instead; their retry
            # reaches a listener that is still open.
            with contextlib.suppress(OSError):
                listener.socket.listen(0)
        for _ in range(LISTEN_BACKLOG):
            try:
                sock, _address = listener.socket.accept()
            except OSError:
                break  # Empty (EAGAIN), or out of descriptors: the rest get the reset.
            # A TLS client cannot read a plain-text notice: it gets a clean EOF.
            _tell(sock, None if self.tls else self.goodbye)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                sock.close()  # Already gone: nothing to linger for.
            else:
                self._dismissed[sock.fileno()] = sock
            dismissed += 1
        with self._lock:
            self._rejected += dismissed
            self._counters.rejected[RejectReason.STOPPING] += dismissed
        return dismissed

    def _discard_from_dismissed(self, fd: int) -> None:
        sock = self._dismissed[fd]
        try:
            if sock.recv(DEFAULT_CHUNK_SIZE, socket.MSG_DONTWAIT):
                return  # Input dropped (never served); its EOF is still to come.
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass  # Reset: the client is gone.
        del self._dismissed[fd]
        sock.close()

    def _close_dismissed(self) -> None:
        for sock in self._dismissed.values():
            sock.close()
        self._dismissed.clear()

    def _wait_for_connections(self, deadline: float, until_forced: bool = True) -> None:
        self._wait_until(
            lambda: not self._connections and not self._dismissed, deadline, until_forced
        )

    def _wait_until(
        self, done: Callable[[], bool], deadline: float, until_forced: bool = True
    ) -> bool:
        """Wait on the control pipe until ``done()`` holds; it is called under the lock.

        Returns True when it holds, False at the deadline or, with
        ``until_forced``, once the stop is forced.
        """
        while True:
            if self._dismissed and time.monotonic() >= self._dismissed_until:
                self._close_dismissed()
            with self._lock:
                if done():
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (until_forced and self._force_requested):
                return False
            if self._dismissed:
                remaining = min(remaining, self._dismissed_until - time.monotonic())
            self._wait_control(max(0.0, remaining))

    def _wait_control(self, timeout: float) -> None:
        # Signal handlers write to the control pipe, so a second Ctrl-C ends
        # this wait at once. poll(), not select(): the pipe's descriptor may
        # be above 1023 in a process that already has many files open. The
        # dismissed listen-queue clients are watched here too: the stop's
        # waits are the only time they need.
        poller = select.poll()
        poller.register(self._control_r, select.POLLIN)
        for fd in self._dismissed:
            poller.register(fd, select.POLLIN)
        for fd, _events in poller.poll(int(timeout * 1000) + 1):
            if fd == self._control_r:
                _drain(self._control_r)
            else:
                self._discard_from_dismissed(fd)

    def _report_stuck_threads(
        self, leftover: dict[Connection, threading.Thread | None]
    ) -> list[str]:
        stuck = []
        with self._lock:
            # Still registered: a thread that unregistered is only finishing.
            still_there = [(c, t) for c, t in leftover.items() if c in self._connections]
        for _conn, thread in still_there:
            if thread is None or not thread.is_alive():
                continue  # Never picked up by a thread, or already gone.
            stuck.append(thread.name)
            logger.error(
                "thread %r did not stop (it ignores its cancel token); abandoning it. Stack:\n%s",
                thread.name,
                _stack_of(thread),
            )
            # Its socket is already shut down; closing it here would free the
            # descriptor number while that thread may still use it.
        return stuck

    def _release_resources(self) -> None:
        if self._agent is not None:
            self._agent.close()
        for listener in self._listeners:
            listener.close()
        with self._lock:
            abandoned = bool(self._connections) or any(t.is_alive() for t in self._finishing)
        if abandoned:
            # A stuck thread may still wake up and poll a stop descriptor or write
            # to the control pipe; closing them would let those fd numbers be
            # reused under its feet. A few descriptors are a small price.
            return
        control = (self._control_r, self._control_w)
        self._control_r = self._control_w = -1
        for fd in control:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._broadcast.close()

    @contextlib.contextmanager
    def _signal_handling(self) -> Iterator[None]:
        from ._signals import stop_on_signals

        if self.handle_signals and threading.current_thread() is threading.main_thread():
            with stop_on_signals(self._request_stop, self._request_force, lambda: self.grace):
                yield
        else:
            yield


def serve(
    handler: Handler, bind: str | Sequence[str] = DEFAULT_BIND, **settings: Any
) -> StopReport:
    """Serve ``handler`` in this thread until SIGINT, SIGTERM or ``stop()``; return the report.

    ``settings`` are the keyword arguments of :class:`Server`.
    """
    with Server(handler, bind, **settings) as server:
        return server.serve_forever()


def _raised_by_connection(exc: BaseException) -> bool:
    """Whether ``exc`` came out of this connection's own I/O (a Connection method).

    The innermost frame of such an error is a Connection method, or the
    standard library's socket/ssl wrappers it called. Errors from anything
    else the handler does (its database driver, say) end elsewhere.
    """
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    for filename in reversed(frames):
        if filename not in _IO_WRAPPER_FILES:
            return filename == _connection_module.__file__
    return False


#: Library modules between a Connection method and the system call.
_IO_WRAPPER_FILES = frozenset({ssl.__file__, socket.__file__})


def _report_stuck_hook(thread: threading.Thread, callback: CancelCallback | None) -> str:
    logger.error(
        "cancel callback %r did not return; abandoning it. Stack:\n%s", callback, _stack_of(thread)
    )
    return thread.name


def _stack_of(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    return "".join(traceback.format_stack(frame)).rstrip() if frame else "(no stack)"


def _tell(sock: socket.socket, notice: bytes | None) -> None:
    """One line to a client that gets no thread.

    Unread input would turn the close into a reset that can destroy the
    notice in flight, so what the client already sent is read and dropped
    first (it was never served, so nothing read is lost). The notice is tiny
    and fits the empty send buffer: no waiting. This runs on the accept
    loop, where every system call counts (each one hands the GIL to a busy
    connection thread): usually one ioctl and one send.
    """
    try:
        for _ in range(16):  # Bounded: a client streaming at us gets the reset.
            if not queued_bytes(sock.fileno()) or not sock.recv(
                DEFAULT_CHUNK_SIZE, socket.MSG_DONTWAIT
            ):
                break
        if notice:
            sock.send(notice, socket.MSG_DONTWAIT)
    except OSError:
        pass  # The client already left, or its buffer is full: nothing more to tell it.


def _tell_and_close(sock: socket.socket, notice: bytes | None) -> None:
    """Tell, then close at once: FIN after the notice, as no input is left unread.

    A client that sends after this close still gets a reset; while serving,
    a lingering close per turned-away client would cost the accept loop more
    than the flood it defends against.
    """
    try:
        _tell(sock, notice)
    finally:
        sock.close()


def _tune_listener(sock: socket.socket, keepalive: bool) -> None:
    """Set per-connection TCP options once, on the listener: Linux copies them to
    every accepted socket, which saves a few system calls per connection."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    # Replies are small and prompt: Nagle's algorithm would hold one back
    # until the previous one is acknowledged.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive:
        # Each platform's own option names (macOS has no TCP_KEEPIDLE): _keepalive.py.
        for level, option, value in keepalive_options(
            KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES
        ):
            sock.setsockopt(level, option, value)


def _nonblocking_pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    return read_fd, write_fd


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 4096):
            pass


def _check_seconds(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value < MAX_SECONDS
    ):
        raise ConfigurationError(
            f"{name}={value!r}: must be a number of seconds from 0 to {MAX_SECONDS:g}"
        )
