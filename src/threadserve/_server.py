"""The server: each connection's thread, and the facade that composes the parts.

Theory of operation
===================

One thread (the *serving thread*: whoever calls ``serve_forever``, usually
the main thread) waits in ``select`` on the listening sockets and on a
*control pipe*. Each accepted client gets its own daemon thread running the
handler with a ``Connection``, and removes it from the registry of live
connections (_registry.py) in ``finally``, so the registry prunes itself. A
connection thread whose client has left takes the next waiting client from
the listen queue itself before it parks, so under load most clients never
wait for the accept loop (_accept.py: the loop, direct accepts, back-off).

Nothing polls on a timer. Everything that must reach the serving thread (a
stop request from a signal handler or another thread, a force request, "the
last connection just finished") writes one byte to the control pipe. Writing
to a pipe takes no lock, which is what makes it safe from a signal handler
that may have interrupted code holding one.

Stopping (``stop()``, SIGINT, SIGTERM) ends the accept loop; the serving
thread then runs the stop sequence (_stop.py: tell the listen queue, close
the listeners, wake connections in waves, drain, force at the grace
deadline, report stuck threads). Each connection thread, seeing the stop,
finishes what it had read, writes the goodbye notice, sends FIN and lingers
(``_finish_connection``). How a connection ended, from what its handler
raised to the reason counted, the notice sent and whether to linger, is
sorted out in _ending.py.

Shared state is changed under ``_lock``; socket I/O happens outside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _setup
from ._accept import Acceptor, drain_pipe
from ._admission import Admission, OverloadPolicy
from ._agent import AgentResponder
from ._broadcast import StopBroadcast
from ._checks import CHUNK_SIZE, IDLE_THREADS, SHORT_WAIT, check_handler, check_type
from ._connection import DEFAULT_CHUNK_SIZE, Connection
from ._ending import COMPLETED, ending_of
from ._events import CloseReason, Counters, RejectReason
from ._exceptions import ConfigurationError
from ._gil import threads_changed
from ._keepalive import keepalive_options
from ._listeners import (
    Listener,
    format_address,
    open_listeners,
    parse_bind_address,
)
from ._notices import Notices
from ._proxy import ProxyMode
from ._ratelimit import RateLimitedLog
from ._registry import Registry
from ._stop import FORCE_MARGIN, StopReport, StopSequence, _tell
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
#: TCP keepalive: probe after 60 s of silence, every 10 s, give up after 3
#: unanswered probes. A client that vanished (power loss, cable, NAT timeout)
#: frees its thread after about 90 s instead of never.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES = 60, 10, 3

_current = threading.local()


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
        check_handler(handler)
        for name, seconds in (
            ("grace", grace),
            ("linger", linger),
            ("drain_delay", drain_delay),
            ("idle_thread_timeout", idle_thread_timeout),
        ):
            SHORT_WAIT.check(name, seconds)
        IDLE_THREADS.check("idle_threads", idle_threads)
        CHUNK_SIZE.check("chunk_size", chunk_size)
        # Checked here, not where each is first used: that is in a connection
        # thread, or at the stop, where the mistake would show as a handler error.
        check_type("timeouts", timeouts, (Timeouts, type(None)), "a threadserve.Timeouts or None")
        check_type("goodbye", goodbye, (bytes, bytearray, str, type(None)), "bytes, str or None")
        check_type("notices", notices, (Notices, type(None)), "a threadserve.Notices or None")
        check_type("tls", tls, (ssl.SSLContext, type(None)), "an ssl.SSLContext or None")
        if isinstance(bind, (bytes, int)):
            raise ConfigurationError(
                f"bind={bind!r}: expected an address such as '127.0.0.1:8000', or a list of them"
            )
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

        # Guards the registry, and the accept and stop state changed with it.
        self._lock = threading.Lock()
        # Live connections, their threads and the counts (_registry.py).
        self._registry = Registry(self._admission)
        # Raise sys.setswitchinterval with the number of connections, so
        # thousands of GIL waiters cannot start a convoy (see _gil.py).
        self._adapt_switch_interval = adapt_switch_interval
        # The accept loop, and finishing threads' own accepts (_accept.py).
        self._acceptor: Acceptor[Connection] = Acceptor(
            lock=self._lock,
            admission=self._admission,
            listeners=self._listeners,
            control_fd=self._control_r,
            admit=self._admit,
            dispatch=self._dispatch,
            wake=self._wake,
            wait_control=self._wait_control,
            stop_requested=lambda: self._stop_requested,
        )
        # Connection threads park between connections (see _threads.py).
        self._threads: ParkingThreads[Connection] = ParkingThreads(
            self._run_connection,
            max_idle=idle_threads,
            idle_timeout=idle_thread_timeout,
            next_job=self._acceptor.take_next_client,
        )
        # Set without the lock (a signal handler may set them); read by the serving thread.
        self._stop_requested = False
        self._force_requested = False
        self._serving_started = False
        self._serving_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._report: StopReport | None = None
        self._background: threading.Thread | None = None
        self._spawn_queue: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        self._rejections_log = RateLimitedLog(logger, logging.WARNING)
        self._proxy_log = RateLimitedLog(logger, logging.WARNING)
        # The stop sequence, and the stop state connections read (_stop.py).
        self._stop = StopSequence(
            lock=self._lock,
            registry=self._registry,
            listeners=self._listeners,
            threads=self._threads,
            broadcast=self._broadcast,
            wait=self._wait_control,
            forced=lambda: self._force_requested,
            on_stop_accepting=lambda: self._call_hook(self.on_stop_accepting),
        )
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
        start a graceful stop and a second one forces it. So does SIGHUP, in a
        process with a controlling terminal and no other SIGHUP handler (a
        terminal sends it when it closes), except that it never forces.
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
                    self._acceptor.run(self._keep_accepting, lambda: self._drain_until)
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
            SHORT_WAIT.check("grace", grace)
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
            registry = self._registry
            bytes_in, bytes_out = registry.bytes_moved()
            return ServerStatistics(
                connections_active=len(registry.live),
                connections_accepted=registry.accepted,
                connections_closed=registry.closed,
                connections_rejected=registry.rejected,
                bytes_received=bytes_in,
                bytes_sent=bytes_out,
                handler_errors=registry.handler_errors,
                accept_errors=self._acceptor.errors,
                counters=registry.counters.copy(),
                proxy_rejected=registry.proxy_rejected,
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
        return self._drain_until is not None and not self._stop.stopping

    def connections(self) -> list[Connection]:
        """The live connections right now (a copy)."""
        with self._lock:
            return list(self._registry.live)

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    def hand_over_listeners(self) -> bool:
        """Give the listening sockets to a successor process; False, giving nothing, once stopping.

        For an in-place upgrade (SIGUSR2, or one process's SIGHUP reload; see
        _upgrade.py): from now on the stop leaves their queues (and a Unix
        socket's file) to the successor. Under the lock that the stop takes
        before it reads whose the queues are, so that either the stop began
        first, and nothing is handed over, or the stop finds them handed over.
        """
        with self._lock:
            if self._stop_requested:
                return False
            for listener in self._listeners:
                listener.hand_over()
        return True

    def pause_accepting(self) -> None:
        """Take no more clients from the listeners, but go on serving the connections there are.

        For a worker about to hand its shared listening socket over to the
        others (see _supervisor.py): clients it accepted a moment ago still
        get their request answered before the stop, and new ones wait in
        the kernel's queue for the other workers. Safe from any thread.

        A queue of its own (``SO_REUSEPORT``) nobody else serves: it stops
        taking new clients (their SYNs are dropped and retried, and the retry
        lands on another listener of the group once this one closes) while
        this server goes on accepting and serving what waits in it, so the
        stop finds it empty. With no shared listener, accepting goes on.
        """
        own = [x for x in self._listeners if x.reuse_port and x.owns_queue]
        for listener in own:
            listener.refuse_new_clients()
        if len(own) < len(self._listeners):
            self._acceptor.hand_over()
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
        live = len(self._registry.live)
        return f"<Server {state} on {', '.join(self.addresses)} connections={live}>"

    # ------------------------------------------------------------------ accepting

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

    def _admit(self, sock: socket.socket, address: object, family: int) -> Connection | None:
        """Admit a new client and register its connection (None: turned away and closed)."""
        peer = format_address(family, address)
        ip = address[0] if isinstance(address, tuple) else None
        if self._proxy is not None:
            if not self._proxy.allows(ip):
                self._acceptor.failed()
                self._reject_proxy(peer, "not in proxy_allow")
                sock.close()
                return None
            # Every client of a proxy comes from its address: count them per
            # address once the header names them (_readmit).
            ip = None
        refusal = self._acceptor.settle(self._registry.count_in, ip)
        if refusal is None:
            return self._register(sock, peer, ip)
        self._turn_away(sock, peer, *refusal)
        return None

    def _reject_proxy(self, peer: str, reason: object) -> None:
        with self._lock:
            self._registry.count_proxy_rejected()
        self._proxy_log.emit("PROXY protocol: closing %s: %s", peer, reason)

    def _readmit(self, conn: Connection, ip: str | None) -> str | None:
        """Count ``conn`` under the client its proxy reported; or say why that client is over."""
        with self._lock:
            refusal = self._registry.readmit(conn, ip)
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

    def _register(self, sock: socket.socket, peer: str, ip: str | None) -> Connection:
        """The connection for an admitted client, in the registry; no thread serves it yet."""
        sock.setblocking(False)
        group, stop_fd = self._broadcast.assign(len(self._registry.live))
        conn = Connection(
            sock,
            peer,
            stop_fd=stop_fd,
            timeouts=self.timeouts,
            chunk_size=self.chunk_size,
            client_ip=ip,
            stop_group=group,
            stop_begun=self._stop.begun,
        )
        with self._lock:
            self._registry.add(conn)
        if self._adapt_switch_interval:
            threads_changed(+1)
        return conn

    def _dispatch(self, conn: Connection) -> None:
        """Have a thread serve ``conn``: a parked one, else a new one."""
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
            self._acceptor.resource_error(
                "cannot start a thread for %s: %s; closing it", conn.peer, exc
            )
            conn._close_socket()
            self._unregister(conn, "no thread", CloseReason.NO_THREAD)

    # ------------------------------------------------------------------ one connection

    def _run_connection(self, conn: Connection) -> None:
        thread = threading.current_thread()
        thread.name = f"threadserve {conn.peer}"  # A reused thread is renamed for its new peer.
        _current.server = self
        with self._lock:
            self._registry.serve(conn, thread)
        # Checked first: the line's fields would otherwise be built for every
        # connection, logged or not. (Behind a proxy it is logged once the
        # header names the client.)
        if self._proxy is None and logger.isEnabledFor(logging.INFO):
            logger.info(
                "connection opened: %s",
                conn.peer,
                extra={"event": "connection_opened", "peer": conn.peer},
            )
        ending = COMPLETED
        try:
            _setup.set_up(conn, self._setup_steps)  # PROXY header, then TLS handshake.
            if self._proxy is not None:
                thread.name = f"threadserve {conn.peer}"  # The client the proxy reported.
            self.handler(conn)
        except Exception as exc:
            stopping, tls = self._stop.stopping, self.tls is not None
            ending = ending_of(exc, stopping=stopping, notices=self.notices, tls=tls)
            if ending.handler_error:
                self._count_handler_error(conn)  # Inside the except: it logs the traceback.
            elif ending.reason is CloseReason.PROXY_ERROR:
                self._reject_proxy(conn.peer, exc)
        finally:
            reason = ending.reason
            if reason is CloseReason.COMPLETED and self._stop.stopping:
                reason = CloseReason.STOPPED
            try:
                if ending.abandon:
                    conn._close_socket()
                else:
                    self._finish_connection(conn, ending.notice)
            finally:
                self._unregister(conn, ending.outcome, reason)

    def _count_handler_error(self, conn: Connection) -> None:
        with self._lock:
            self._registry.count_handler_error()
        logger.exception("handler failed for %s", conn.peer)

    def _finish_connection(self, conn: Connection, cutoff_notice: bytes | None) -> None:
        # Group members leave first; at stop, a member waits (up to the grace
        # deadline) for the others to finish reading, so that what they had
        # read reaches it before its notice. Then its linger starts.
        stopping = self._stop.stopping
        conn._run_closing_hooks(
            self._stop.deadline - FORCE_MARGIN if stopping else time.monotonic() + self.linger
        )
        now = time.monotonic()
        linger_until = now + self.linger
        notice = cutoff_notice
        linger_elsewhere = None
        if self._stop.stopping:
            if notice is None and not conn._peer_eof:
                notice = self.goodbye
            linger_until = self._stop.linger_until(now, self.linger)
            # The stop lingers for it, and this thread can end now.
            linger_elsewhere = self._stop.take_over_linger
        conn._close_gracefully(notice, linger_until, linger_elsewhere)

    def _unregister(
        self, conn: Connection, outcome: str, reason: CloseReason = CloseReason.COMPLETED
    ) -> None:
        # Log first: the admission slot is freed below, and a thread still
        # busy after that is one more than max_connections allows.
        duration = time.monotonic() - conn.opened_at
        if logger.isEnabledFor(logging.INFO):  # Fields built only for a line that is logged.
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
        # In a connection thread (not a failed thread start): the stop joins it.
        here = getattr(_current, "server", None) is self
        thread = threading.current_thread() if here else None
        with self._lock:
            live = self._registry.remove(conn, reason, duration, thread)
            # A loop paused at max_connections listens to the control pipe
            # only: this connection's slot is what it waits for.
            wake = self._acceptor.paused
            if self._stop.connection_left(live):
                wake = True
        if self._adapt_switch_interval:
            threads_changed(-1)
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
        # No finishing thread accepts from here on: the listeners are the
        # stop's to empty and close.
        self._acceptor.close_direct(FORCE_MARGIN)
        # A TLS client cannot read a plain-text notice: the listen queue's
        # clients get a clean EOF instead.
        self._report = self._stop.run(
            grace=self.grace, linger=self.linger, notice=None if self.tls else self.goodbye
        )
        return self._report

    def _wait_control(self, timeout: float, watch: Collection[int] = ()) -> list[int]:
        """Wait up to ``timeout`` s for a wake-up; return the ``watch`` descriptors readable."""
        # Signal handlers write to the control pipe, so a second Ctrl-C ends
        # this wait at once. poll(), not select(): the pipe's descriptor may
        # be above 1023 in a process that already has many files open. The
        # stop sequence watches its told listen-queue clients here too.
        poller = select.poll()
        poller.register(self._control_r, select.POLLIN)
        for fd in watch:
            poller.register(fd, select.POLLIN)
        ready = []
        for fd, _events in poller.poll(int(timeout * 1000) + 1):
            if fd == self._control_r:
                drain_pipe(self._control_r)
            else:
                ready.append(fd)
        return ready

    def _release_resources(self) -> None:
        if self._agent is not None:
            self._agent.close()
        for listener in self._listeners:
            listener.close()
        with self._lock:
            abandoned = self._registry.threads_remain()
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
            with stop_on_signals(
                self._request_stop, self._request_force, lambda: self.grace, self._control_w
            ):
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
