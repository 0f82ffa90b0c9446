"""Upgrading in place (SIGUSR2): a new supervisor, or a new lone process, takes the listeners over.

Theory of operation
===================

On SIGUSR2 the supervisor starts its successor as a child, the way a fresh
start would: ``sys.executable -m threadserve`` with the same arguments, so
a new threadserve (or a new Python behind the same path) is what runs. The
successor inherits the listening sockets as descriptors and finds them
named in one environment variable, ``THREADSERVE_HANDOVER``, together with
the old supervisor's pid (the variable is honoured only by a process whose
parent has that pid, as systemd's ``LISTEN_PID`` is, so a handler's own
subprocess never takes the sockets), the number of workers wanted now (a
SIGTTIN or SIGTTOU since the start counts) and one end of a control
channel: a ``SOCK_SEQPACKET`` socket pair, one message per packet.

The successor binds nothing. It starts its workers on the inherited
sockets; they accept from the same kernel queues as the old workers, so
both generations serve side by side for a moment. Then::

    successor -> old:  "ready"       every new worker accepts
    old -> successor:  "take over"   after MAINPID= to systemd and the pid file
    old: its workers stop accepting, drain and stop (as in a reload); then it exits

or, when the successor cannot start (its workers cannot import the
handler, its own import fails, it is not ready in time)::

    successor -> old:  "fatal MESSAGE"   and it exits 1
    old: logs the message and goes on serving, as if nothing had been asked

Why a child rather than ``exec`` in place (the pid kept): after an exec the
old program is gone, so a new version that cannot start could only take
the service down with it. A child that fails leaves the old supervisor
exactly as it was. The cost is the pid changes, which is why the old
supervisor sends ``MAINPID=<new pid>`` (with ``READY=1``) to systemd and
rewrites the pid file before it stops anything: systemd accepts MAINPID=
from the main process, so it has to come from the old one. (gunicorn's
USR2 also forks a new master; cloudflare/tableflip has this same shape.)

Until "take over" the queues are not the successor's: if it stops before
then, it leaves the clients waiting in them to the old supervisor instead
of telling them goodbye. A successor whose channel ends before "take over"
(the old supervisor was killed) takes over at once, since nobody else will
serve.

With ``--reuse-port`` the old supervisor also binds one more set of
sockets for the successor's first worker, without listening: they join
their SO_REUSEPORT groups only when that worker serves (see
Listener.listen), so no client waits in them while the successor starts,
and if it fails there is nobody in them to tell.

The agent's socket (``--agent-bind``) and the metrics socket (``--metrics``)
are handed over the same way, so neither address is ever refused: the new
supervisor answers the agent as soon as its workers are ready (both say
``up ready`` for that moment), and serves the metrics only once it has taken
over, so that a scrape never alternates between two supervisors' sums.

A ``unix:PATH`` socket's file is removed only by the process that bound it
(see Listener), so after an upgrade it stays behind at the final stop; the
next start finds it stale and removes it.

One process (no ``--workers``) upgrades the same way, with one server on
each side (``ServerUpgrade``): the successor, started with ``workers`` 0 in
the hand-over, builds its server on the inherited sockets and says
``ready`` once it accepts; the old process sends ``MAINPID=``, rewrites the
pid file, says ``take over``, stops accepting (its listeners handed over:
their queue and their Unix socket file are the successor's now), serves
what it accepted a moment ago for HANDOVER_SETTLE, then stops gracefully
and exits 0. Everything waiting in the kernel's queues is the successor's
to accept: nothing is told or reset. The agent (``--agent-bind``) and the
metrics (``--metrics``) are one process's own sockets, not handed over, so
with either one SIGUSR2 (and the reload's SIGHUP) is logged and ignored (use ``--workers``).

For one process without a controlling terminal, SIGHUP (reload) does the
same as SIGUSR2: the successor is a fresh interpreter that imports the
handler anew, which is what a reload is (in a terminal, SIGHUP stops: see
_hangup.py). Only what is said differs: "reloading" in the log, and ``RELOADING=1``
to systemd, closed by the ``READY=1`` of the hand-over (or of the failure).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ._exceptions import ConfigurationError
from ._listeners import Listener
from ._pidfile import write_pid_file
from ._signals import signal_name
from ._systemd import Notifier

logger = logging.getLogger("threadserve")

HANDOVER_VARIABLE = "THREADSERVE_HANDOVER"

READY = b"ready"
TAKE_OVER = b"take over"
FATAL = b"fatal "

#: One process: how long its successor has to accept before it is stopped.
SERVER_UPGRADE_TIMEOUT = 60.0
#: One process handing its listeners over stops accepting, and stops this
#: much later: a client it accepted just before has time for its request to
#: arrive and be answered (the supervisor's HANDOVER_SETTLE).
HANDOVER_SETTLE = 0.25
#: After asking a successor that failed or must go to stop, how long to
#: wait for its exit before SIGKILL.
SUCCESSOR_EXIT_WAIT = 10.0
#: What ServerUpgrade.close writes to its wake-up pipe; a signal handler
#: writes the signal's number, and no signal is 0.
_CLOSE_BYTE = 0


@dataclass(frozen=True)
class Handover:
    """What a successor inherits.

    ``parent;channel;workers;fd:owns,fd:owns;agent fd,fd;metrics fd``, the
    last two possibly empty (and absent when an older threadserve hands over).
    """

    parent: int
    channel: int
    workers: int
    #: (descriptor, owns_queue) for every inherited listener.
    sockets: tuple[tuple[int, bool], ...]
    #: The agent responder's listening descriptors (``--agent-bind``).
    agent: tuple[int, ...] = ()
    #: The metrics endpoint's listening descriptor (``--metrics``).
    metrics: int | None = None

    def encode(self) -> str:
        sockets = ",".join(f"{fd}:{int(owns)}" for fd, owns in self.sockets)
        agent = ",".join(str(fd) for fd in self.agent)
        metrics = "" if self.metrics is None else str(self.metrics)
        return f"{self.parent};{self.channel};{self.workers};{sockets};{agent};{metrics}"

    @classmethod
    def decode(cls, text: str) -> Handover:
        try:
            parent, channel, workers, sockets, *extra = text.split(";")
            agent, metrics = extra if extra else ("", "")
            pairs = [item.split(":") for item in sockets.split(",") if item]
            return cls(
                int(parent),
                int(channel),
                int(workers),
                tuple((int(fd), owns == "1") for fd, owns in pairs),
                tuple(int(fd) for fd in agent.split(",") if fd),
                int(metrics) if metrics else None,
            )
        except ValueError:
            raise ConfigurationError(f"malformed {HANDOVER_VARIABLE}={text!r}") from None

    def listeners(self) -> list[Listener]:
        """The inherited listening sockets (closing them all if one is not one)."""
        opened: list[Listener] = []
        try:
            for fd, owns in self.sockets:
                # bound_only: a --reuse-port worker's sockets, not listening yet.
                opened.append(Listener.inherit(fd, owns_queue=owns, bound_only=True))
        except BaseException:
            for listener in opened:
                listener.socket.close()
            raise
        return opened


def take_handover(environ: dict[str, str] | None = None) -> Handover | None:
    """The handover meant for this process, if any; the variable is removed either way."""
    env = os.environ if environ is None else environ
    text = env.pop(HANDOVER_VARIABLE, None)
    if text is None:
        return None
    handover = Handover.decode(text)
    if handover.parent != os.getppid():
        return None  # Inherited by a process further down: not ours.
    return handover


class Successor:
    """The old supervisor's view of the supervisor it started to take over."""

    def __init__(
        self,
        command: Sequence[str],
        environ: dict[str, str],
        listeners: Sequence[Listener],
        workers: int,
        *,
        agent: Sequence[int] = (),
        metrics: int | None = None,
    ) -> None:
        self.channel, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            handover = Handover(
                os.getpid(),
                child.fileno(),
                workers,
                tuple((listener.fileno(), listener.owns_queue) for listener in listeners),
                tuple(agent),
                metrics,
            )
            extra = [*agent, *([] if metrics is None else [metrics])]
            self.process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                pass_fds=[child.fileno(), *(listener.fileno() for listener in listeners), *extra],
                env={**environ, HANDOVER_VARIABLE: handover.encode()},
                # The same process group as this one: once it has taken over,
                # a Ctrl-C at the terminal reaches it as it reached us, as
                # long as we run (an interactive shell takes its terminal back
                # when the process it started exits, and this one is not it).
            )
        except BaseException:
            self.channel.close()
            raise
        finally:
            child.close()
        self.started_at = time.monotonic()
        self.ready = False
        self.handed_over = False
        self.fatal: str | None = None
        #: When to SIGTERM it for not being ready, then when to SIGKILL it.
        self.terminate_at: float | None = None
        self.kill_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def receive(self) -> list[bytes]:
        """Messages waiting on the channel; an empty one means it ended."""
        return _receive(self.channel)

    def send(self, message: bytes) -> bool:
        return _send(self.channel, message)

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)


class Predecessor:
    """The new supervisor's view of the old one, until it has handed over."""

    def __init__(self, handover: Handover) -> None:
        self.pid = handover.parent
        self.channel = socket.socket(fileno=handover.channel)
        self.handed_over = False

    def receive(self) -> list[bytes]:
        return _receive(self.channel)

    def send(self, message: bytes) -> bool:
        return _send(self.channel, message)


def _receive(channel: socket.socket) -> list[bytes]:
    messages = []
    while channel.fileno() >= 0:
        try:
            message = channel.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            message = b""
        messages.append(message)
        if not message:
            channel.close()
            break
    return messages


def _send(channel: socket.socket, message: bytes) -> bool:
    try:
        channel.send(message)
    except OSError:
        return False
    return True


class Serving(Protocol):
    """The server as an upgrade sees it (threadserve.Server)."""

    grace: float

    @property
    def stopping(self) -> bool: ...
    def hand_over_listeners(self) -> bool: ...
    def pause_accepting(self) -> None: ...
    def stop(self, grace: float | None = None) -> object: ...


class ServerUpgrade:
    """SIGUSR2 (upgrade) and SIGHUP (reload) for one process: a successor takes its listeners over.

    ``request`` is the signal handler: it only writes the signal's number to
    a pipe. A thread of its own does the rest (start the successor, wait for
    its ``ready``, hand over, stop the server), so the serving thread never
    waits for an upgrade. ``close`` ends that thread; a successor that has
    not taken over by then is stopped with this process.
    """

    def __init__(
        self,
        server: Serving,
        listeners: Sequence[Listener],
        command: Sequence[str],
        environ: dict[str, str],
        *,
        notifier: Notifier,
        pid_file: str | None = None,
        timeout: float = SERVER_UPGRADE_TIMEOUT,
    ) -> None:
        self.server = server
        self.listeners = list(listeners)
        self.command = list(command)
        self.environ = environ
        self.notifier = notifier
        self.pid_file = pid_file
        self.timeout = timeout
        self.successor: Successor | None = None
        self._reload = False  # The successor under way answers a SIGHUP, not a SIGUSR2.
        self._closing = False
        self._wake_r, self._wake_w = os.pipe()
        for fd in self._wake_r, self._wake_w:
            os.set_blocking(fd, False)
        self._thread = threading.Thread(target=self._run, name="threadserve upgrade", daemon=True)
        self._thread.start()

    @property
    def handed_over(self) -> bool:
        """The successor serves now: this process's stop is no news for systemd."""
        return self.successor is not None and self.successor.handed_over

    def request(self, signum: int, frame: object) -> None:
        """The signal handler: runs between two bytecodes, so it only wakes the thread."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, bytes([signum]))

    def close(self) -> None:
        """End the upgrade thread; stop a successor that has not taken over."""
        self._closing = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, bytes([_CLOSE_BYTE]))
        # Long enough for an abandoned successor's own graceful stop (_abandon),
        # so that its end is not asked for twice (a second SIGTERM forces).
        self._thread.join(self.server.grace + 2 * SUCCESSOR_EXIT_WAIT)
        successor = self.successor
        if successor is not None and not successor.handed_over:
            logger.info("stopping the new server process %d too", successor.pid)
            _end(successor)
        if successor is not None:
            successor.channel.close()
        for fd in self._wake_r, self._wake_w:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        channel = -1  # The successor's channel as registered (receive() may close it).
        while not self._closing:
            successor = self.successor
            timeout = None
            if successor is not None:
                remaining = successor.started_at + self.timeout - time.monotonic()
                timeout = max(0, int(remaining * 1000) + 1)
            woken: list[int] = []  # The signals that woke this thread, in order.
            for fd, _events in poller.poll(timeout):
                if fd == self._wake_r:
                    woken = self._received_signals()
            if self._closing:
                return
            if woken and successor is None and self.server.stopping:
                # Its listeners close with the stop: nothing is left to hand over.
                self._ignore(woken, "stopping")
            elif woken and successor is None:
                first, *later = woken
                self._start(first)
                if self.successor is not None:
                    channel = self.successor.channel.fileno()
                    poller.register(channel, select.POLLIN)
                    self._ignore(later, f"{self._doing} to process {self.successor.pid} already")
                else:
                    self._ignore(later, f"came with the {signal_name(first)} that failed")
                continue
            if successor is None:
                continue
            self._ignore(woken, f"{self._doing} to process {successor.pid} already")
            messages = successor.receive()
            if READY in messages:
                # The listeners first, under the stop's own lock: a stop that
                # began before keeps them, and the successor is ended instead.
                if self.server.hand_over_listeners():
                    self._hand_over(successor)
                else:
                    self._abandon(successor)
                return
            for message in messages:
                if message.startswith(FATAL):
                    successor.fatal = message[len(FATAL) :].decode(errors="replace")
            ended = not messages[-1:] or messages[-1] == b""
            late = time.monotonic() >= successor.started_at + self.timeout
            if (messages and ended) or late:
                poller.unregister(channel)
                self._failed(successor, late=late and not (messages and ended))

    @property
    def _doing(self) -> str:
        return "reloading" if self._reload else "upgrading"

    @property
    def _what(self) -> str:
        return "reload" if self._reload else "upgrade"

    def _received_signals(self) -> list[int]:
        """The signals the handler passed on since the last call, in order, emptying the pipe.

        Two signals may come before this thread reads (a SIGUSR2 and a
        SIGHUP sent together): the first is acted on and the others logged
        as ignored, so that none goes by unsaid.
        """
        received: list[int] = []
        with contextlib.suppress(OSError):  # BlockingIOError once it is empty.
            while data := os.read(self._wake_r, 64):
                received.extend(b for b in data if b != _CLOSE_BYTE)
        return received

    @staticmethod
    def _ignore(signals: Sequence[int], why: str) -> None:
        for signum in signals:
            logger.info("%s ignored: %s", signal_name(signum), why)

    def _start(self, signum: int) -> None:
        self._reload = signum == signal.SIGHUP
        try:
            self.successor = Successor(self.command, self.environ, self.listeners, 0)
        except (OSError, ValueError) as exc:  # ValueError: a stop closed the listeners just now.
            logger.error("%s failed: cannot start %s: %s", self._what, self.command[0], exc)
            return
        pid = self.successor.pid
        logger.info(
            "%s received: %s: new server process %d started", signal_name(signum), self._doing, pid
        )
        status = f"{self._doing}: new server process {pid} starting"
        if self._reload:
            self.notifier.reloading(status)
        else:
            self.notifier.status(status)

    def _failed(self, successor: Successor, *, late: bool) -> None:
        if late:
            successor.fatal = successor.fatal or f"not serving after {self.timeout:.0f} s"
        status = _end(successor)
        how = f"killed by {signal_name(-status)}" if status < 0 else f"exited with {status}"
        stopping = self.server.stopping  # Then STOPPING=1 has gone out: nothing more to say.
        logger.error(
            "%s failed: new server process %d: %s (%s); %s",
            self._what,
            successor.pid,
            successor.fatal or "it ended before it was serving",
            how,
            "this process is stopping" if stopping else f"process {os.getpid()} goes on serving",
        )
        if not stopping:
            # A reload's READY=1 ends its RELOADING=1; an upgrade only says so.
            say = self.notifier.ready if self._reload else self.notifier.status
            say(f"{self._what} failed, serving")
        successor.channel.close()
        self.successor = None  # Another SIGUSR2 or SIGHUP may try again.

    def _abandon(self, successor: Successor) -> None:
        """The server began to stop while its successor started: that one stops too.

        The stop has closed (or is closing) the listeners the successor was
        to take over, and the service manager has heard STOPPING=1. Serving,
        the successor may have taken clients from the shared queue: it gets
        a whole grace period for its own graceful stop before SIGKILL.
        """
        logger.info(
            "%s abandoned: this server is stopping; stopping the new server process %d",
            self._what,
            successor.pid,
        )
        _end(successor, self.server.grace + SUCCESSOR_EXIT_WAIT)
        successor.channel.close()
        self.successor = None

    def _hand_over(self, successor: Successor) -> None:
        logger.info("process %d is serving: handing over to it, this process stops", successor.pid)
        done = "reloaded" if self._reload else "upgraded"
        announce_successor(
            successor, self.notifier, self.pid_file, f"{done}: process {successor.pid} serving"
        )
        self.notifier.close()
        self.server.pause_accepting()
        # Not a wait for a state: the margin for requests already on their way.
        # Only close() cuts it short; a signal now changes nothing.
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        settled_at = time.monotonic() + HANDOVER_SETTLE
        while not self._closing and (left := settled_at - time.monotonic()) > 0:
            poller.poll(int(left * 1000) + 1)
            self._ignore(self._received_signals(), f"handing over to process {successor.pid}")
        self.server.stop()


def announce_successor(
    successor: Successor, notifier: Notifier, pid_file: str | None, status: str
) -> None:
    """Make ``successor`` the main process for systemd and the pid file, then let it take over.

    Called before anything of this process stops, so that whoever reads them
    never finds a process that is leaving; and ``MAINPID=`` is only heeded
    from the main process, which this one still is.
    """
    notifier.notify(mainpid=successor.pid, ready=1, status=status)
    if pid_file:
        try:
            write_pid_file(pid_file, successor.pid)
        except ConfigurationError as exc:
            logger.error("%s", exc)
    successor.send(TAKE_OVER)
    successor.handed_over = True


def take_over_when_told(predecessor: Predecessor, listeners: Sequence[Listener]) -> None:
    """A successor of one process: own the listeners' queues once it hands over.

    Until then what waits in them is the old process's (it tells them if
    it stops first); from "take over", or the old process's end, it is this
    one's. Runs a daemon thread watching the channel.
    """
    owned = [listener for listener in listeners if listener.owns_queue]
    for listener in owned:
        listener.owns_queue = False

    def watch() -> None:
        poller = select.poll()
        poller.register(predecessor.channel, select.POLLIN)
        while predecessor.channel.fileno() >= 0:
            poller.poll()
            messages = predecessor.receive()
            if TAKE_OVER in messages or b"" in messages:
                predecessor.handed_over = True
                for listener in owned:
                    listener.owns_queue = True
                logger.info("process %d handed over: this one serves now", predecessor.pid)
                predecessor.channel.close()
                return

    threading.Thread(target=watch, name="threadserve take-over", daemon=True).start()


def _end(successor: Successor, wait: float = SUCCESSOR_EXIT_WAIT) -> int:
    """Ask a successor that is not taking over to stop; SIGKILL after ``wait`` s; its status."""
    successor.signal(signal.SIGTERM)
    try:
        return successor.process.wait(wait)
    except subprocess.TimeoutExpired:
        successor.signal(signal.SIGKILL)
        return successor.process.wait()
