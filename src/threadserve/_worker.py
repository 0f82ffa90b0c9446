"""One worker process of a supervisor (see _supervisor.py): the worker's side.

A worker is a fresh interpreter, started by the supervisor with
``python -m threadserve serve ARGS --worker-control FD --worker-listen FD...``:
the same command line as the supervisor's, plus the descriptors it inherited.
It imports the handler itself (so a reload picks up new code), builds an
ordinary ``Server`` on the inherited listening sockets and serves in its main
thread, where that Server handles SIGINT and SIGTERM as always: the first
stops gracefully, a second forces. Nothing of the supervisor's threads,
pipes or eventfds exists here, since nothing was forked.

The control channel is a ``SOCK_SEQPACKET`` socket pair, one message per
packet. The supervisor sends two messages:

* ``pause``: stop accepting (the other workers take over the shared queue;
  an own ``--reuse-port`` queue is taken and served, new SYNs dropped) but
  go on serving; the worker answers ``paused`` and SIGTERM follows a moment
  after that.
* ``stats?``: answer with a statistics snapshot (see _workerstats.py); the
  supervisor sums them for ``--metrics``.

The worker sends:

* ``ready``: the handler imported, the server built, its accept loop and
  signal handlers about to run; send clients. A ``--reuse-port`` worker's
  own sockets, bound by the supervisor, start listening just before this
  (and join their SO_REUSEPORT groups only then).
* ``beat``: sent every ``beat_interval`` by a thread that first takes the
  server's lock (``statistics()``), so a worker whose server is wedged stops
  beating, and so does one whose interpreter is stuck holding the GIL.
* ``paused``: it took no more clients from the listeners (``pause``); the
  supervisor's SIGTERM follows a moment after this.
* ``closed``: the stop has closed this worker's listeners.
* ``recycle``: ``--max-worker-connections`` reached; the supervisor starts a
  replacement and stops this worker once the replacement is ready.
* ``fatal MESSAGE``: the worker could not start; it exits 1.
* ``stats {...}``: a statistics snapshot, asked for or (once its server has
  stopped, just before it exits) its last word.

The same thread watches the channel for end-of-file: the supervisor is gone,
so the worker stops gracefully instead of living on as an orphan. On Linux
the worker also asks the kernel for SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``): the same graceful stop, even if the channel were
somehow still open elsewhere. (A worker wedged holding the GIL runs no
Python signal handler either; that one the supervisor's heartbeat kills,
while the supervisor lives.)

SIGUSR2 is ignored: it is for the supervisor (an upgrade), and ``systemctl
kill -s USR2`` sends it to every process of the unit, workers included.

SIGUSR1 dumps every thread's stack to stderr and then ends the process. The
dump runs in C (faulthandler), so it works even while Python code holds the
GIL forever; the supervisor sends it to a worker that stopped beating, which
leaves the stacks in the log and the exit status says the dump is complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import faulthandler
import logging
import os
import random
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence

from ._exceptions import ThreadserveError
from ._listeners import Listener
from ._server import Server
from ._workerstats import REQUEST as STATS_REQUEST
from ._workerstats import encode as encode_statistics

logger = logging.getLogger("threadserve")

READY = b"ready"
BEAT = b"beat"
CLOSED = b"closed"
RECYCLE = b"recycle"
FATAL = b"fatal "
PAUSE = b"pause"
PAUSED = b"paused"

#: Linux's prctl option: a signal for this process when its parent dies.
PR_SET_PDEATHSIG = 1

#: Asks a worker for its stacks (then it ends): see the module docstring.
DUMP_SIGNAL = signal.SIGUSR1
#: Recycling thresholds are spread by up to this fraction, so workers started
#: together do not all restart together.
RECYCLE_JITTER = 0.1

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_FORCED = 3

BuildServer = Callable[[Callable[[], object], Callable[[], object]], Server]


def run_worker(
    control_fd: int,
    build_server: BuildServer,
    *,
    beat_interval: float,
    max_connections: int | None = None,
    supervisor: int | None = None,
    listeners: Sequence[Listener] = (),
) -> int:
    """Serve as a worker until stopped; return the exit status.

    ``build_server(on_serving, on_stop_accepting)`` builds the Server on the
    inherited listeners; a ThreadserveError from it (the handler does not import, say)
    goes to the supervisor as ``fatal`` and the exit status is 1.
    ``supervisor``: the supervisor's pid, for the parent-death signal.
    ``listeners``: those of them bound only start listening once the server
    serves, just before ``ready`` (see _listeners.open_listeners).
    """
    channel = socket.socket(fileno=control_fd)
    if supervisor is not None:
        stop_with_parent(supervisor)
    # The supervisor's signals, which a `pkill -HUP -f threadserve` or a
    # `systemctl kill -s USR2` also sends to every worker: the supervisor
    # acts on them, and at their default they would end this worker with its
    # clients reset. A do-nothing handler rather than SIG_IGN: an ignored
    # signal would stay ignored in every program a handler starts.
    signal.signal(signal.SIGUSR2, _ignore)
    signal.signal(signal.SIGHUP, _ignore)
    faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=True)
    try:
        try:
            server = build_server(
                lambda: _serving(channel, listeners), lambda: _send(channel, CLOSED)
            )
        except ThreadserveError as exc:
            if not _send(channel, FATAL + str(exc).encode(errors="replace")):
                print(f"threadserve: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        limit = None
        if max_connections:
            limit = max_connections + random.randint(0, int(max_connections * RECYCLE_JITTER))
        finished = threading.Event()
        # Wakes the watcher the moment the server has stopped, instead of at
        # its next beat: a stopping worker (a reload, an upgrade) exits up to
        # a beat interval sooner.
        wake_r, wake_w = os.pipe()
        watcher = threading.Thread(
            target=_watch,
            args=(channel, server, finished, beat_interval, limit, wake_r),
            name="threadserve worker heartbeat",
            daemon=True,
        )
        try:
            with server:
                watcher.start()
                try:
                    report = server.serve_forever()
                finally:
                    finished.set()
                    os.write(wake_w, b"\0")
                    watcher.join(beat_interval + 1.0)
                    # The last word: what this worker counted up to its end,
                    # so the supervisor's sums keep it once the worker is gone.
                    _send(channel, encode_statistics(server.statistics(), threading.active_count()))
        finally:
            os.close(wake_r)
            os.close(wake_w)
        return EXIT_OK if report.clean else EXIT_FORCED
    finally:
        channel.close()


def _watch(
    channel: socket.socket,
    server: Server,
    finished: threading.Event,
    beat_interval: float,
    limit: int | None,
    wake: int,
) -> None:
    """Beat, ask to be recycled at the connection limit, and stop if the supervisor dies."""
    poller = select.poll()
    poller.register(channel, select.POLLIN)
    poller.register(wake, select.POLLIN)
    recycle_sent = False
    while not finished.is_set():
        events = poller.poll(int(beat_interval * 1000))
        if finished.is_set():
            return  # The server stopped (the wake-up pipe): nothing left to watch.
        if events:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                message = channel.recv(64, socket.MSG_DONTWAIT)
                if message == PAUSE:
                    server.pause_accepting()
                    _send(channel, PAUSED)
                elif message == STATS_REQUEST:
                    stats = server.statistics()
                    _send(channel, encode_statistics(stats, threading.active_count()))
                if message:
                    continue
            if not finished.is_set():
                logger.warning("the supervisor is gone: stopping this worker")
                server.stop()
            return
        # Taking the server's lock is the point: a wedged server stops beating.
        accepted = server.statistics().connections_accepted
        if not _send(channel, BEAT):
            continue  # The supervisor is gone: the poll above sees the EOF next.
        if limit is not None and accepted >= limit and not recycle_sent:
            logger.info("served %d connections (limit %d): asking to be recycled", accepted, limit)
            recycle_sent = _send(channel, RECYCLE)


def _serving(channel: socket.socket, listeners: Sequence[Listener]) -> None:
    """The server is about to accept: listen where not yet, then tell the supervisor."""
    for listener in listeners:
        try:
            listener.listen()
        except OSError as exc:
            logger.error("cannot listen on %s: %s", listener.address, exc)
    _send(channel, READY)


def stop_with_parent(parent: int) -> bool:
    """Ask Linux for SIGTERM when ``parent`` (the supervisor) dies; False where unsupported.

    The request binds to the parent as it is when made, so a supervisor
    that died before it leaves this worker reparented already: then it is
    stopped at once, the same way.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _ignore(signum: int, frame: object) -> None:
    """SIGUSR2 reached a worker: it is the supervisor's signal, nothing to do here."""


def _send(channel: socket.socket, message: bytes) -> bool:
    try:
        channel.send(message)
    except OSError:
        return False
    return True
