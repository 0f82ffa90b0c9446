"""N worker processes under one supervisor: start, watch, reload, upgrade, stop.

Theory of operation
===================

The supervisor binds every address (all or none, as one process would),
then starts N workers (see _worker.py): fresh interpreters, each running an
ordinary ``Server`` on the inherited listening sockets. It runs no handler
code. Its main thread waits in ``poll`` on a self-pipe and on each worker's
control channel; nothing polls on a timer except the deadlines it knows of
(heartbeats, kills, the systemd watchdog).

Signal handlers only queue the signal and write a byte to the self-pipe;
the main loop handles them in order (gunicorn's arbiter has this shape):

* SIGINT, SIGTERM: stop. With a drain delay, the workers first go on
  serving for that long while the agent (``--agent-bind``, answered here,
  not by the workers) says ``drain``; a second signal during the delay
  ends it and forces. Then every worker gets SIGTERM at once and stops
  gracefully in parallel, keeping the stop contract. Once they have all
  closed their listeners, the supervisor tells the clients still waiting in
  the shared listen queue (notice, FIN, lingering close) and closes it. A
  second signal is passed on, which forces each worker. Exit 0 when every
  worker drained, 3 when any was forced.
* SIGHUP: reload. N new workers start (importing the handler afresh); once
  every one has said ``ready``, the old ones stop gracefully. A new worker
  that cannot start aborts the reload and the old ones keep serving. With a
  drain delay and the agent, the agent says ``drain`` from the SIGHUP, the
  old workers go on serving until the delay is over *and* the new ones are
  ready, then stop, and the agent says ``up ready`` again: the load balancer
  sends this instance no new client while its workers change. Without a
  drain delay the agent says ``up ready`` throughout: the old workers hand
  the shared queue over to ready new ones, so the instance as a whole never
  stops accepting. In a terminal, SIGHUP stops instead, as SIGTERM does
  (but a second one never forces); under nohup it stays ignored (see
  _hangup.py).
* SIGTTIN, SIGTTOU: one worker more, one fewer (never fewer than one, nor
  more than MAX_WORKERS).
* SIGUSR2: upgrade the supervisor itself (see _upgrade.py). A successor
  (``sys.executable -m threadserve`` with the same arguments: a new
  threadserve or Python) starts as a child, inherits the listening sockets
  and starts its own workers on them. Once every one is ready, this
  supervisor sends systemd ``MAINPID=`` with ``READY=1``, rewrites the pid
  file, stops its workers as a reload would and exits 0; the successor
  serves on. A successor that cannot start is logged and this supervisor
  goes on serving.
* SIGCHLD: reap. A worker that died unasked is logged with its status and
  replaced at once.

Listening sockets: by default one socket per address, shared by every
worker, so nothing in its queue is lost when a worker stops: the others
accept it. A worker that stops for a reload therefore leaves the queue
alone (its listeners do not own the queue), and only the final stop
dismisses it. With ``reuse_port`` each worker gets TCP listeners of its own
in a ``SO_REUSEPORT`` group; the kernel would reset what sits in a closed
one's queue. A worker handing over (reload, recycling, one fewer, upgrade)
is paused first as in the shared mode, which for its own queue means: new
SYNs are dropped (the client's retry, a second later, lands on another
listener of the group once this one has closed) while what already waits is
accepted and served. Its stop then finds the queue empty; at the final stop
what still waits is told, as one server's stop does.

Boot failure: a worker that exits before ``ready`` at the first start makes
the supervisor stop the others and exit 1 with the worker's message. A
reload's new worker that fails calls the reload off (the old workers serve
on; the operator fixes the code and reloads again). Later (replacing a dead
worker, recycling, scaling up) the failure is logged and the start tried
again after a back-off (0.5 s, doubling to 30 s, back to 0.5 s once a worker
starts), so a passing failure (memory, a database the handler's import
needed) heals, and a broken handler on disk costs one attempt per 30 s, not
a restart loop. When no worker is left serving at all, the supervisor stops
and exits 1.

Metrics (``--metrics``): the supervisor serves them, summed over its
workers (see _workerstats.py): a scrape wakes this loop, which asks every
worker for a snapshot over its channel and waits a moment for the answers.
Restarts are counted here by reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ._agent import AgentResponder
from ._checks import INTERVAL, MAX_WORKERS, SHORT_WAIT, WORKERS
from ._connection import DEFAULT_CHUNK_SIZE
from ._exceptions import ConfigurationError
from ._hangup import has_controlling_terminal, sighup_ignored
from ._listeners import LISTEN_BACKLOG, BindAddress, Listener, open_listeners
from ._logging import counted
from ._pidfile import remove_pid_file, write_pid_file
from ._signals import signal_name, signals_handled
from ._stop import _tell
from ._systemd import Notifier
from ._upgrade import FATAL as UPGRADE_FATAL
from ._upgrade import READY as UPGRADE_READY
from ._upgrade import TAKE_OVER, Predecessor, Successor, announce_successor
from ._worker import BEAT, CLOSED, DUMP_SIGNAL, FATAL, PAUSE, PAUSED, READY, RECYCLE
from ._workerstats import REPLY as STATS_REPLY
from ._workerstats import REQUEST as STATS_REQUEST
from ._workerstats import RestartReason, Snapshot, WorkerStatistics
from ._workerstats import decode as decode_statistics

logger = logging.getLogger("threadserve")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_FORCED = 3

DEFAULT_WORKER_TIMEOUT = 30.0
#: After the grace period, how long a stopping worker has to report and exit
#: before it is killed (its own stop forces at the grace period).
STOP_MARGIN = 2.0
#: How long a worker asked for its stacks gets to write them before SIGKILL.
DUMP_WAIT = 2.0
#: A worker handing its shared listeners over (reload, recycling, one fewer)
#: first stops accepting, and is stopped only this much later: a client it
#: accepted just before has time for its request to arrive and be answered,
#: instead of meeting the stop with nothing read yet and being told goodbye.
HANDOVER_SETTLE = 0.25
#: The settle time counts from the worker's "paused" (its listeners handed
#: over), not from asking: on a busy machine the asking can take a while to
#: be read. A worker that does not answer this long is stopped anyway.
PAUSE_ANSWER_WAIT = 5.0
#: A successor (SIGUSR2) not ready after this many worker timeouts is
#: stopped: it has its own interpreter and all its workers to start.
UPGRADE_TIMEOUTS = 2
#: A replacement worker that could not start is tried again after this,
#: doubling up to RETRY_MAX (see the module docstring).
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
#: How long a metrics scrape waits for the workers' snapshots; a worker
#: that has not answered by then counts with its latest one.
STATISTICS_WAIT = 1.0
SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR2,
    signal.SIGCHLD,
)


class MetricsServing(Protocol):
    """The metrics endpoint as the supervisor sees it (_metrics.MetricsEndpoint)."""

    def start(self) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int: ...


@dataclass(eq=False)
class Worker:
    """What the supervisor knows of one worker process."""

    process: subprocess.Popen[bytes]
    channel: socket.socket
    generation: int
    started_at: float
    last_beat: float
    ready: bool = False
    stopping: bool = False
    accepting: bool = True
    fatal: str | None = None
    #: Stop this worker once ``replacement`` is ready (recycling).
    replaced_by: Worker | None = None
    #: When to SIGKILL it: after a stacks dump, or past its stop deadline.
    kill_at: float | None = None
    #: When to send SIGTERM to a worker handing over (see HANDOVER_SETTLE).
    terminate_at: float | None = None
    #: Killed for missing its heartbeat (its stacks were asked for).
    hung: bool = False
    exit_status: int | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.process.pid


class Supervisor:
    """Run ``command`` as N worker processes on ``listeners`` (see the module docstring).

    ``command`` is the worker's command line without the inherited
    descriptors, which are appended per worker. ``reuse_port`` gives each
    worker TCP listeners of its own, bound like the ones given.
    ``predecessor``: this supervisor is an upgrade's successor, taking over
    from that one (see _upgrade.py). ``pid_file``: kept naming the
    supervisor to signal (see _pidfile.py). ``agent``: the HAProxy agent
    responder, bound already, answered from here. ``drain_delay``: on a
    stop signal, keep serving this long while the agent says ``drain``.
    ``metrics``: the metrics endpoint, bound already; started here (by a
    successor once it has taken over), handed over on an upgrade, closed
    at the end.
    """

    def __init__(
        self,
        command: Sequence[str],
        listeners: list[Listener],
        workers: int,
        *,
        reuse_port: bool = False,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
        grace: float = 5.0,
        goodbye: bytes | None = None,
        linger: float = 2.0,
        notifier: Notifier | None = None,
        environ: dict[str, str] | None = None,
        predecessor: Predecessor | None = None,
        pid_file: str | None = None,
        agent: AgentResponder | None = None,
        drain_delay: float = 0.0,
        metrics: MetricsServing | None = None,
    ) -> None:
        WORKERS.check("workers", workers)
        INTERVAL.check("worker_timeout", worker_timeout)
        for name, seconds in (("grace", grace), ("linger", linger), ("drain_delay", drain_delay)):
            SHORT_WAIT.check(name, seconds)
        self.command = list(command)
        self.agent = agent
        self.metrics = metrics
        self.drain_delay = drain_delay
        self._drain_until: float | None = None
        # A reload with a drain delay: the old workers serve on until then.
        self._reload_drain_until: float | None = None
        #: What the workers counted, for --metrics (see _workerstats.py).
        self.statistics = WorkerStatistics()
        # A scrape (another thread) asks for round N; the main loop asks the
        # workers and marks the round done once all answered or left.
        self._stats_changed = threading.Condition()
        self._stats_asked = 0
        self._stats_done = 0
        self._stats_round = 0
        self._stats_awaited: set[int] = set()
        self._stats_round_until = 0.0
        # Starts to try again (see RETRY_FIRST): each entry is the worker a
        # new one is to replace (recycling) or None (one more of ``wanted``).
        self._retries: list[Worker | None] = []
        self._retry_at: float | None = None
        self._retry_backoff = RETRY_FIRST
        self.listeners = listeners
        self.wanted = workers
        self.reuse_port = reuse_port
        self.worker_timeout = worker_timeout
        self.grace = grace
        self.goodbye = goodbye
        self.linger = linger
        self.notifier = notifier or Notifier({})
        self.environ = dict(os.environ if environ is None else environ)
        self.addresses = [listener.address for listener in listeners]
        # reuse_port: each worker binds these afresh; the first set goes to the first worker.
        self._per_worker: list[BindAddress] = []
        self._spare: list[Listener] = []
        if reuse_port:
            for listener in listeners:
                if listener.reuse_port and listener.owns_queue:
                    host, port = listener.socket.getsockname()[:2]
                    self._per_worker.append(BindAddress(host=host, port=port))
                    self._spare.append(listener)
            self.listeners = [item for item in listeners if item not in self._spare]
        self.workers: list[Worker] = []
        self._generation = 0
        self._signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        for fd in self._wake_r, self._wake_w:
            os.set_blocking(fd, False)
        self._stopping = False
        self._forced = False
        # In a terminal SIGHUP means it hung up: a stop, not a reload (_hangup.py).
        self._sighup_stops = has_controlling_terminal()
        self._dismissed: dict[int, socket.socket] = {}
        self._dismiss_until = 0.0
        self._reload: list[Worker] | None = None  # New workers of a reload in progress.
        self._boot_error: str | None = None
        self._booted = False
        self._next_watchdog = 0.0
        self.pid_file = pid_file
        # The upgrade (SIGUSR2) this supervisor started: its successor.
        self._successor: Successor | None = None
        # reuse_port: the listeners bound for the successor's first worker.
        self._successor_spare: list[Listener] = []
        # This supervisor as a successor: until the old one hands over, the
        # clients waiting in the queues are the old one's, and systemd
        # hears from the old one only (it is still the main process).
        self._predecessor = predecessor
        self._queues_to_own: list[Listener] = []
        self._notifier_after_takeover: Notifier | None = None
        if predecessor is not None:
            self._queues_to_own = [item for item in self.listeners if item.owns_queue]
            for listener in self._queues_to_own:
                listener.owns_queue = False
            self._notifier_after_takeover = self.notifier
            self.notifier = Notifier({})

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        """Start the workers and supervise them until stopped; return the exit status."""
        if self.pid_file and self._predecessor is None:
            write_pid_file(self.pid_file, os.getpid())
        try:
            # The wake pipe hears a signal even when another thread (the
            # metrics exporter's) caught it (see _signals.py). The old
            # handlers are back before _close() closes that pipe.
            handled = [s for s in SIGNALS if s != signal.SIGHUP or not sighup_ignored()]
            with signals_handled(handled, self._on_signal, self._wake_w):
                try:
                    if self.metrics is not None and self._predecessor is None:
                        self.metrics.start()
                    self._start_generation()
                    self._loop()
                except BaseException:
                    for worker in self.workers:
                        _kill(worker)
                    if self._successor is not None and not self._successor.handed_over:
                        self._successor.signal(signal.SIGKILL)
                    raise
        finally:
            self._close()
            if self.pid_file:
                remove_pid_file(self.pid_file, os.getpid())
        if self._boot_error is not None:
            print(f"threadserve: error: {self._boot_error}", file=sys.stderr)
            return EXIT_ERROR
        if self._successor is not None and self._successor.handed_over:
            logger.info(
                "supervisor %d exits: supervisor %d serves on", os.getpid(), self._successor.pid
            )
        return EXIT_FORCED if self._forced else EXIT_OK

    def _on_signal(self, signum: int, frame: object) -> None:
        # Runs between two bytecodes of the main loop: only queue and wake.
        self._signals.append(signum)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _loop(self) -> None:
        while self.workers or self._dismissed or self._upgrading():
            self._wait(self._next_deadline())
            while self._signals:
                self._handle_signal(self._signals.pop(0))
            self._reap()
            self._check_deadlines()
            self._advance()
            self._ask_statistics()

    def _wait(self, deadline: float | None) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        channels = {w.channel.fileno(): w for w in self.workers if w.channel.fileno() >= 0}
        for fd in channels:
            poller.register(fd, select.POLLIN)
        for fd in self._dismissed:
            poller.register(fd, select.POLLIN)
        successor = self._successor.channel.fileno() if self._successor else -1
        predecessor = self._predecessor.channel.fileno() if self._predecessor else -1
        for fd in successor, predecessor:
            if fd >= 0:
                poller.register(fd, select.POLLIN)
        timeout = (
            None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
        )
        for fd, _events in poller.poll(timeout):
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError, OSError):
                    while os.read(self._wake_r, 4096):
                        pass
            elif fd in channels:
                self._read_channel(channels[fd])
            elif fd in self._dismissed:
                self._discard_dismissed(fd)
            elif fd == successor:
                self._read_successor()
            elif fd == predecessor:
                self._read_predecessor()

    def _next_deadline(self) -> float | None:
        now = time.monotonic()
        deadlines = []
        for worker in self.workers:
            if worker.terminate_at is not None:
                deadlines.append(worker.terminate_at)
            if worker.kill_at is not None:
                deadlines.append(worker.kill_at)
            elif worker.exit_status is None:
                deadlines.append(worker.last_beat + self.worker_timeout)
        if self._dismissed:
            deadlines.append(self._dismiss_until)
        if self._drain_until is not None and not self._stopping:
            deadlines.append(self._drain_until)
        # Once past, it waits on the new workers' "ready" messages instead:
        # a deadline in the past would make the loop spin until then.
        if self._reload_drain_until is not None and self._reload_drain_until > now:
            deadlines.append(self._reload_drain_until)
        if self._retry_at is not None:
            deadlines.append(self._retry_at)
        if self._successor is not None:
            deadlines += [
                t for t in (self._successor.terminate_at, self._successor.kill_at) if t is not None
            ]
        if self.notifier.watchdog_interval is not None:
            if self._next_watchdog <= now:
                self.notifier.notify(watchdog=1)
                self._next_watchdog = now + self.notifier.watchdog_interval
            deadlines.append(self._next_watchdog)
        # A child may exit without a message (SIGCHLD wakes us, but a signal
        # that arrived between the reap and the poll is only seen here).
        deadlines.append(now + 1.0)
        return min(deadlines)

    # ------------------------------------------------------------------ workers

    def _start_generation(self) -> None:
        self._generation += 1
        self._reload = [self._spawn() for _ in range(self.wanted)]

    def _end_reload_drain(self) -> None:
        """The reload is over (done or called off): the agent says ``up ready`` again."""
        if self._reload_drain_until is not None:
            self._reload_drain_until = None
            if self.agent is not None and not self._stopping and self._drain_until is None:
                self.agent.ready()

    def _spawn(self, replacing: Worker | None = None) -> Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        own: list[Listener] = []
        try:
            if self._per_worker:
                # Bound here (so a problem shows before the worker starts) but
                # listening only once the worker serves: until then the
                # kernel hands its clients to the listeners that accept.
                own = self._spare or open_listeners(self._per_worker, reuse_port=True, listen=False)
                self._spare = []
            args = [
                *self.command,
                "--worker-control",
                str(child.fileno()),
                "--worker-supervisor",
                str(os.getpid()),
            ]
            for listener in self.listeners:
                args += ["--worker-listen", str(listener.fileno())]
            for listener in own:
                args += ["--worker-listen", f"{listener.fileno()}:own"]
            fds = [
                child.fileno(),
                *(x.fileno() for x in self.listeners),
                *(x.fileno() for x in own),
            ]
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                pass_fds=fds,
                env=self.environ,
                # Its own session: a Ctrl-C at the terminal reaches the
                # supervisor only, which passes it on once, not twice.
                start_new_session=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
            # reuse_port: the worker alone holds its listeners now, so its
            # queue closes with it (after it took what waited there).
            for listener in own:
                listener.socket.close()
        now = time.monotonic()
        worker = Worker(process, parent, self._generation, now, now)
        if replacing is not None:
            replacing.replaced_by = worker
        self.workers.append(worker)
        logger.info("worker %d started (generation %d)", worker.pid, self._generation)
        return worker

    def _read_channel(self, worker: Worker) -> None:
        while True:
            try:
                message = worker.channel.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message = b""
            if not message:
                worker.channel.close()  # Exiting: SIGCHLD and the reap do the rest.
                self._answered(worker.pid)
                return
            worker.last_beat = time.monotonic()
            if message.startswith(STATS_REPLY):
                try:
                    self.statistics.update(worker.pid, decode_statistics(message))
                except ValueError as exc:
                    logger.warning("worker %d: %s", worker.pid, exc)
                self._answered(worker.pid)
            elif worker.exit_status is not None:
                # Read after its exit for its last snapshot only: a late
                # "recycle" would start a replacement besides the one its exit starts.
                continue
            elif message == READY:
                worker.ready = True
                self._retry_backoff = RETRY_FIRST  # Starting works (again).
                logger.info("worker %d ready", worker.pid)
            elif message == CLOSED:
                worker.accepting = False
            elif message == PAUSED:
                if worker.terminate_at is not None:
                    settled = time.monotonic() + HANDOVER_SETTLE
                    worker.terminate_at = min(worker.terminate_at, settled)
            elif message == RECYCLE and not worker.stopping and worker.replaced_by is None:
                logger.info("worker %d reached its connection limit: replacing it", worker.pid)
                self.statistics.restarted(RestartReason.RECYCLED)
                self._spawn(replacing=worker)
            elif message.startswith(FATAL):
                worker.fatal = message[len(FATAL) :].decode(errors="replace")
            elif message != BEAT:
                logger.debug("worker %d sent %r", worker.pid, message)

    def _reap(self) -> None:
        for worker in list(self.workers):
            status = worker.process.poll()
            if status is None:
                continue
            worker.exit_status = status
            self.workers.remove(worker)
            if worker.channel.fileno() >= 0:
                self._read_channel(worker)  # Its last words: a final snapshot.
            worker.channel.close()
            self.statistics.retire(worker.pid)
            self._answered(worker.pid)
            self._on_exit(worker, status)

    def _on_exit(self, worker: Worker, status: int) -> None:
        how = f"was killed by {signal_name(-status)}" if status < 0 else f"exited with {status}"
        if worker.stopping:
            logger.info("worker %d stopped: %s", worker.pid, how)
            # SIGTERM kills a worker only before its server installs its
            # signal handlers, which is before it accepts anyone: stopping a
            # worker that was still starting (SIGTTOU, a stop right after a
            # start) loses no client and is not a forced stop.
            started_late = not worker.ready and status == -signal.SIGTERM
            if status != 0 and self._stopping and not started_late:
                self._forced = True
            return
        if not worker.ready:
            reason = worker.fatal or f"worker {worker.pid} {how} before it was ready"
            if not self._booted:
                self._boot_error = reason
                if self._predecessor is not None and not self._predecessor.handed_over:
                    self._predecessor.send(UPGRADE_FATAL + reason.encode(errors="replace"))
                self._begin_stop(quiet=True)
                return
            logger.error("a new worker could not start: %s", reason)
            if self._reload is not None and worker in self._reload:
                logger.error("reload aborted: the old workers go on serving")
                for other in self._reload:
                    self._stop_worker(other)
                self._reload = None
                self._end_reload_drain()
                self.notifier.ready(self._status("reload failed"))
            else:
                replacing = [old for old in self.workers if old.replaced_by is worker]
                for old in replacing:
                    old.replaced_by = None  # It keeps serving until a replacement is ready.
                self._schedule_retry(replacing[0] if replacing else None)
            if not any(w.ready and not w.stopping for w in self.workers):
                self._boot_error = f"no worker left serving: {reason}"
                self._begin_stop()
            return
        if worker.hung:
            logger.error(
                "hung worker %d ended (%s) after its stacks: replacing it", worker.pid, how
            )
            self.statistics.restarted(RestartReason.HUNG)
        else:
            logger.error("worker %d %s unexpectedly: replacing it", worker.pid, how)
            self.statistics.restarted(RestartReason.CRASHED)
        if not self._stopping and not self._handed_over():
            self._spawn()

    def _schedule_retry(self, replacing: Worker | None) -> None:
        """Try that start again after the back-off (see RETRY_FIRST)."""
        if self._stopping or self._handed_over():
            return
        self._retries.append(replacing)
        if self._retry_at is None:
            self._retry_at = time.monotonic() + self._retry_backoff
            logger.warning("trying to start a worker again in %.1f s", self._retry_backoff)
            self._retry_backoff = min(self._retry_backoff * 2, RETRY_MAX)

    def _retry(self) -> None:
        retries, self._retries, self._retry_at = self._retries, [], None
        if self._stopping or self._drain_until is not None or self._handed_over():
            return
        for replacing in retries:
            if replacing is not None:
                if replacing in self.workers and not replacing.stopping:
                    self.statistics.restarted(RestartReason.START_FAILED)
                    self._spawn(replacing=replacing)
            elif sum(1 for w in self.workers if not w.stopping) < self.wanted:
                self.statistics.restarted(RestartReason.START_FAILED)
                self._spawn()

    def _stop_worker(self, worker: Worker, *, handover: bool = False) -> None:
        """Stop one worker gracefully; ``handover``: the others go on serving its queue."""
        if worker.stopping:
            return
        worker.stopping = True
        now = time.monotonic()
        # reuse_port: a worker's own queue has the same moment to be taken
        # and served (Server.pause_accepting) rather than told at its stop.
        hands_over = handover and worker.ready and bool(self.listeners or self._per_worker)
        settle = HANDOVER_SETTLE + PAUSE_ANSWER_WAIT if hands_over else 0.0
        worker.kill_at = now + settle + self.grace + STOP_MARGIN
        if settle:
            with contextlib.suppress(OSError):
                worker.channel.send(PAUSE)
            worker.terminate_at = now + settle  # Brought forward by its "paused".
        else:
            _forward(worker, signal.SIGTERM)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.terminate_at is not None and now >= worker.terminate_at:
                worker.terminate_at = None
                _forward(worker, signal.SIGTERM)
        self._check_successor(now)
        if self._retry_at is not None and now >= self._retry_at:
            self._retry()
        if self._drain_until is not None and now >= self._drain_until and not self._stopping:
            logger.warning(
                "drain delay over: stopping %d workers gracefully (grace %.1f s)",
                len(self.workers),
                self.grace,
            )
            self._begin_stop(quiet=True)  # STOPPING=1 went out when the drain began.
        if self._dismissed and now >= self._dismiss_until:
            for sock in self._dismissed.values():
                sock.close()
            self._dismissed.clear()
        for worker in self.workers:
            if worker.kill_at is not None and now >= worker.kill_at:
                logger.error("worker %d did not exit in time: killing it", worker.pid)
                _kill(worker)
                worker.kill_at = now + self.worker_timeout  # Wait for the reap.
                if self._stopping:
                    self._forced = True
            elif worker.kill_at is None and now - worker.last_beat > self.worker_timeout:
                what = "answered" if worker.ready else "become ready"
                logger.error(
                    "worker %d has not %s for %.1f s (--worker-timeout %g): "
                    "logging its stacks, then killing it",
                    worker.pid,
                    what,
                    now - worker.last_beat,
                    self.worker_timeout,
                )
                _forward(worker, DUMP_SIGNAL)
                worker.kill_at = now + DUMP_WAIT
                worker.hung = True

    def _advance(self) -> None:
        """Move a reload, a recycle or a stop forward once workers are ready or gone."""
        draining = (
            self._reload_drain_until is not None and time.monotonic() < self._reload_drain_until
        )
        if self._reload is not None and all(w.ready for w in self._reload) and not draining:
            new = self._reload
            self._reload = None
            old = [w for w in self.workers if w not in new and not w.stopping]
            for worker in old:
                self._stop_worker(worker, handover=True)
            self._end_reload_drain()
            if not self._booted:
                self._booted = True
                if self.agent is not None:
                    self.agent.start()  # Every worker accepts: "up ready" from now on.
                logger.info(
                    "%d workers ready, serving on %s", len(new), ", ".join(self._all_addresses())
                )
                if self._predecessor is not None and not self._predecessor.handed_over:
                    logger.info("asking supervisor %d to hand over", self._predecessor.pid)
                    self._predecessor.send(UPGRADE_READY)
            else:
                logger.info(
                    "reloaded: %d new workers ready, %d old ones stopping", len(new), len(old)
                )
                for _ in old:
                    self.statistics.restarted(RestartReason.RELOAD)
            self.notifier.ready(self._status("serving"))
        for worker in self.workers:
            if worker.replaced_by is not None and worker.replaced_by.ready and not worker.stopping:
                self._stop_worker(worker, handover=True)
        if self._stopping and self.listeners and all(not w.accepting for w in self.workers):
            self._dismiss_queues()
        self.statistics.set_workers(sum(1 for w in self.workers if w.ready and not w.stopping))

    def _adjust(self, change: int) -> None:
        if self._stopping:
            return
        serving = [w for w in self.workers if not w.stopping and w.replaced_by is None]
        if change > 0:
            if self.wanted >= MAX_WORKERS:
                logger.info("SIGTTIN ignored: %d workers is the most", MAX_WORKERS)
                return
            self.wanted += 1
            self._spawn()
        elif len(serving) > 1:
            self.wanted -= 1
            self._stop_worker(serving[0], handover=True)  # The oldest.
        else:
            logger.info("SIGTTOU ignored: one worker is the fewest")
            return
        logger.info("now %d workers", self.wanted)
        self.notifier.status(self._status("serving"))

    # ------------------------------------------------------------------ signals

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # The reap after every wake-up handles it.
        name = signal_name(signum)
        if signum == signal.SIGHUP and self._sighup_stops:
            if self._stopping or self._drain_until is not None:
                # A closing terminal may send it twice: the second must not force.
                logger.info("SIGHUP ignored: stopping already")
                return
            signum = signal.SIGTERM  # Stops as the first SIGTERM does, logged as SIGHUP.
        force_hint = "send it again to force" if name != "SIGHUP" else "SIGTERM or SIGINT forces"
        if signum in (signal.SIGINT, signal.SIGTERM):
            if self._drain_until is not None and not self._stopping:
                logger.warning("%s received again: ending the drain, forcing every worker", name)
                self._begin_stop(quiet=True)
                self._forced = True
                for worker in self.workers:
                    # SIGTERM went out just now; a worker's server takes a
                    # different second signal as the second one even if both
                    # are still pending (the same one twice would merge).
                    _forward(worker, signal.SIGINT)
            elif self._stopping and self._boot_error is None:
                logger.warning("%s received again: forcing every worker", name)
                self._forced = True
                for worker in self.workers:
                    _forward(worker, signal.SIGTERM)
                if self._upgrading():
                    assert self._successor is not None
                    self._successor.signal(signal.SIGTERM)
            elif self.drain_delay and self._booted and not self._upgrading():
                logger.warning(
                    "%s received: draining for %.1f s (the agent says drain, the workers "
                    "go on serving), then stopping; %s",
                    name,
                    self.drain_delay,
                    force_hint,
                )
                self._drain_until = time.monotonic() + self.drain_delay
                self._reload = None
                if self.agent is not None:
                    self.agent.drain()
                self.notifier.stopping(self._status("draining"))
            else:
                logger.warning(
                    "%s received: stopping %d workers gracefully (grace %.1f s); %s",
                    name,
                    len(self.workers),
                    self.grace,
                    force_hint,
                )
                self._begin_stop()
        elif self._stopping or self._drain_until is not None:
            logger.info("%s ignored: stopping", name)
        elif self._successor is not None:
            what = "handing over to" if self._successor.handed_over else "upgrading to"
            logger.info("%s ignored: %s supervisor %d", name, what, self._successor.pid)
        elif signum == signal.SIGHUP:
            if self._reload is not None:
                logger.info("SIGHUP ignored: a reload is already in progress")
                return
            logger.info("SIGHUP received: starting %d new workers", self.wanted)
            self.notifier.reloading(self._status("reloading"))
            if self.drain_delay and self.agent is not None and self._booted:
                logger.info(
                    "the agent says drain for at least %.1f s, until the new workers serve",
                    self.drain_delay,
                )
                self._reload_drain_until = time.monotonic() + self.drain_delay
                self.agent.drain()
            self._start_generation()
        elif signum == signal.SIGTTIN:
            self._adjust(+1)
        elif signum == signal.SIGTTOU:
            self._adjust(-1)
        elif signum == signal.SIGUSR2:
            self._upgrade()

    def _begin_stop(self, quiet: bool = False) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._reload = None
        if self.agent is not None:
            self.agent.drain()
        if not quiet:
            self.notifier.stopping(self._status("stopping"))
        for worker in self.workers:
            self._stop_worker(worker)
        if self._upgrading():
            assert self._successor is not None
            logger.info("stopping the new supervisor %d too", self._successor.pid)
            self._successor.signal(signal.SIGTERM)

    # ------------------------------------------------------------------ statistics

    def collect(self, timeout: float = STATISTICS_WAIT) -> Snapshot:
        """Fresh sums over every worker (from another thread: a metrics scrape).

        Wakes the main loop, which asks each worker; returns once all have
        answered, or after ``timeout`` with the latest snapshots known.
        """
        with self._stats_changed:
            self._stats_asked += 1
            wanted = self._stats_asked
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")
        with self._stats_changed:
            self._stats_changed.wait_for(lambda: self._stats_done >= wanted, timeout)
        return self.statistics.total()

    def _ask_statistics(self) -> None:
        """A scrape asked and no round is out: ask every worker that can answer."""
        with self._stats_changed:
            if self._stats_asked <= self._stats_round:
                return
            if self._stats_awaited:
                if time.monotonic() < self._stats_round_until:
                    return  # This round's answers are still coming.
                # A worker that never answered (a hung one, killed soon):
                # give the round up, so the next scrape asks anew.
                self._stats_awaited = set()
                self._stats_done = self._stats_round
                self._stats_changed.notify_all()
            self._stats_round = self._stats_asked
        awaited = set()
        for worker in self.workers:
            if worker.channel.fileno() >= 0:
                with contextlib.suppress(OSError):
                    worker.channel.send(STATS_REQUEST)
                    awaited.add(worker.pid)
        with self._stats_changed:
            self._stats_awaited = awaited
            if not awaited:
                self._stats_done = self._stats_round
                self._stats_changed.notify_all()
            self._stats_round_until = time.monotonic() + STATISTICS_WAIT

    def _answered(self, pid: int) -> None:
        with self._stats_changed:
            if pid not in self._stats_awaited:
                return
            self._stats_awaited.discard(pid)
            if not self._stats_awaited:
                self._stats_done = self._stats_round
                self._stats_changed.notify_all()

    # ------------------------------------------------------------------ the shared queue

    def _dismiss_queues(self) -> None:
        """Tell the clients left in the shared listen queues, then close the listeners.

        The same as one server's stop step 1 (Server._dismiss_listen_queue),
        done here because only once every worker has stopped accepting is
        what waits in a shared queue nobody's to serve.
        """
        self._dismiss(self.listeners)
        self.listeners = []

    def _dismiss(self, listeners: list[Listener]) -> None:
        """Tell the clients waiting in ``listeners``' queues (the ones they own); close them."""
        told = 0
        now = time.monotonic()
        self._dismiss_until = now + min(self.linger, self.grace)
        for listener in listeners:
            if not listener.owns_queue:
                continue
            for _ in range(LISTEN_BACKLOG):
                try:
                    sock, _address = listener.socket.accept()
                except OSError:
                    break
                _tell(sock, self.goodbye)
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    sock.close()
                    continue
                sock.setblocking(False)
                self._dismissed[sock.fileno()] = sock
                told += 1
        for listener in listeners:
            listener.close()
        if told:
            logger.info("%s waiting in the listen queue were told", counted(told, "client"))

    def _discard_dismissed(self, fd: int) -> None:
        sock = self._dismissed[fd]
        try:
            if sock.recv(DEFAULT_CHUNK_SIZE):
                return  # Dropped: never served. Its EOF is still to come.
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        del self._dismissed[fd]
        sock.close()

    # ------------------------------------------------------------------ upgrade

    def _upgrade(self) -> None:
        """Start a successor that takes the listeners over (see _upgrade.py)."""
        if self._reload is not None:
            logger.info("SIGUSR2 ignored: a reload is in progress")
            return
        if self._predecessor is not None and not self._predecessor.handed_over:
            logger.info(
                "SIGUSR2 ignored: still taking over from supervisor %d", self._predecessor.pid
            )
            return
        try:
            # reuse_port: the successor's first worker needs listeners of its
            # own; bound here (a problem shows before anything starts) but
            # not listening: they join the group when that worker serves, so
            # no client waits in them while two interpreters start, and none
            # is lost if the successor fails.
            spare = (
                open_listeners(self._per_worker, reuse_port=True, listen=False)
                if self._per_worker
                else []
            )
        except ConfigurationError as exc:
            logger.error("upgrade failed: %s; supervisor %d goes on serving", exc, os.getpid())
            return
        environ = {**self.environ, **self.notifier.environment()}
        try:
            self._successor = Successor(
                self.command,
                environ,
                [*self.listeners, *spare],
                self.wanted,
                agent=[] if self.agent is None else self.agent.filenos(),
                metrics=None if self.metrics is None else self.metrics.fileno(),
            )
        except OSError as exc:
            for listener in spare:
                listener.close()
            logger.error("upgrade failed: cannot start %s: %s", self.command[0], exc)
            return
        self._successor_spare = spare
        self._successor.terminate_at = (
            self._successor.started_at + UPGRADE_TIMEOUTS * self.worker_timeout
        )
        logger.info(
            "SIGUSR2 received: upgrading: new supervisor %d started (%s)",
            self._successor.pid,
            " ".join(self.command[:3]),
        )
        self.notifier.status(f"upgrading: new supervisor {self._successor.pid} starting")

    def _upgrading(self) -> bool:
        """A successor is starting and has not taken over yet."""
        return self._successor is not None and not self._successor.handed_over

    def _handed_over(self) -> bool:
        return self._successor is not None and self._successor.handed_over

    def _read_successor(self) -> None:
        successor = self._successor
        assert successor is not None
        for message in successor.receive():
            if message == UPGRADE_READY and not successor.ready and not self._stopping:
                successor.ready = True
                self._hand_over(successor)
            elif message.startswith(UPGRADE_FATAL):
                successor.fatal = message[len(UPGRADE_FATAL) :].decode(errors="replace")

    def _hand_over(self, successor: Successor) -> None:
        """The successor is serving: make it the main process, then stop ours as a reload does."""
        old = [w for w in self.workers if not w.stopping]
        logger.info(
            "supervisor %d is ready: handing over to it, stopping %d old workers",
            successor.pid,
            len(old),
        )
        announce_successor(
            successor, self.notifier, self.pid_file, f"upgraded: supervisor {successor.pid} serving"
        )
        self.notifier.close()
        self.notifier = Notifier({})
        # The successor answers the agent and serves the metrics from now
        # on, on the same sockets: this process lets go of its descriptors.
        if self.agent is not None:
            self.agent.close(handed_over=True)
            self.agent = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        successor.terminate_at = successor.kill_at = None
        for worker in old:
            self._stop_worker(worker, handover=True)
        # Our copies of the sockets: the successor's are the same sockets, so
        # only the descriptors close here; nothing is dismissed, and a Unix
        # socket's file stays (Listener.close would remove it).
        for listener in [*self.listeners, *self._spare, *self._successor_spare]:
            listener.socket.close()
        self.listeners, self._spare, self._successor_spare = [], [], []

    def _check_successor(self, now: float) -> None:
        """Reap the successor, or stop one that is not ready in time."""
        successor = self._successor
        if successor is None or successor.process.returncode is not None:
            return  # None, or it exited after taking over: it stays, marking us handed over.
        status = successor.process.poll()
        if status is not None:
            self._successor_exited(successor, status)
        elif successor.terminate_at is not None and now >= successor.terminate_at:
            logger.error(
                "upgrade failed: new supervisor %d not ready after %.0f s: stopping it",
                successor.pid,
                now - successor.started_at,
            )
            successor.fatal = successor.fatal or "not ready in time"
            successor.signal(signal.SIGTERM)
            successor.terminate_at = None
            successor.kill_at = now + self.grace + STOP_MARGIN
        elif successor.kill_at is not None and now >= successor.kill_at:
            successor.signal(signal.SIGKILL)
            successor.kill_at = None

    def _successor_exited(self, successor: Successor, status: int) -> None:
        successor.channel.close()
        how = f"was killed by {signal_name(-status)}" if status < 0 else f"exited with {status}"
        if successor.handed_over:
            logger.error("new supervisor %d %s after taking over", successor.pid, how)
            return
        self._successor = None  # Another upgrade may be tried.
        if self._stopping:
            logger.info("new supervisor %d stopped: %s", successor.pid, how)
        else:
            reason = successor.fatal or f"it {how} before it was ready"
            logger.error(
                "upgrade failed: new supervisor %d: %s; supervisor %d goes on serving",
                successor.pid,
                reason,
                os.getpid(),
            )
            self.notifier.status(self._status("upgrade failed, serving"))
        if self._successor_spare:
            self._dismiss(self._successor_spare)
            self._successor_spare = []

    def _read_predecessor(self) -> None:
        predecessor = self._predecessor
        assert predecessor is not None
        for message in predecessor.receive():
            if message == TAKE_OVER:
                self._take_over(predecessor, f"supervisor {predecessor.pid} handed over")
            elif not message and not predecessor.handed_over and not self._stopping:
                self._take_over(predecessor, f"supervisor {predecessor.pid} is gone")
        if predecessor.channel.fileno() < 0:
            self._predecessor = None if predecessor.handed_over else predecessor

    def _take_over(self, predecessor: Predecessor, why: str) -> None:
        predecessor.handed_over = True
        for listener in self._queues_to_own:
            listener.owns_queue = True
        self._queues_to_own = []
        if self._notifier_after_takeover is not None:
            self.notifier = self._notifier_after_takeover
            self._notifier_after_takeover = None
        if self.metrics is not None:
            self.metrics.start()  # Only now: a scrape sees one supervisor's sums at a time.
        logger.info("%s: supervisor %d is the one serving now", why, os.getpid())

    # ------------------------------------------------------------------ helpers

    def _all_addresses(self) -> list[str]:
        return self.addresses

    def _status(self, state: str) -> str:
        serving = sum(1 for w in self.workers if w.ready and not w.stopping)
        return f"{state}: {serving} of {self.wanted} workers on {', '.join(self.addresses)}"

    def _close(self) -> None:
        if self._stopping and self.listeners:
            self._dismiss_queues()
        if self.agent is not None:
            self.agent.close()
        if self.metrics is not None:
            self.metrics.close()
        for sock in self._dismissed.values():
            sock.close()
        self._dismissed.clear()
        for listener in [*self.listeners, *self._spare]:
            listener.close()
        for worker in self.workers:
            worker.channel.close()
        for listener in self._successor_spare:
            listener.close()
        if self._successor is not None:
            self._successor.channel.close()
        if self._predecessor is not None:
            self._predecessor.channel.close()
        if self._notifier_after_takeover is not None:
            self._notifier_after_takeover.close()
        for fd in self._wake_r, self._wake_w:
            with contextlib.suppress(OSError):
                os.close(fd)


def _forward(worker: Worker, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        worker.process.send_signal(signum)


def _kill(worker: Worker) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        worker.process.kill()


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
