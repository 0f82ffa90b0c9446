"""Upgrading the supervisor itself (SIGUSR2): a new supervisor takes the listeners over.

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
listeners into each group for the successor's first worker, and keeps them
until the successor is ready: if it fails, the clients waiting in them are
told goodbye by the old supervisor instead of being reset.

The agent's socket (``--agent-bind``) and the metrics socket (``--metrics``)
are handed over the same way, so neither address is ever refused: the new
supervisor answers the agent as soon as its workers are ready (both say
``up ready`` for that moment), and serves the metrics only once it has taken
over, so that a scrape never alternates between two supervisors' sums.

A ``unix:PATH`` socket's file is removed only by the process that bound it
(see Listener), so after an upgrade it stays behind at the final stop; the
next start finds it stale and removes it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ._exceptions import ConfigurationError
from ._listeners import Listener

HANDOVER_VARIABLE = "THREADSERVE_HANDOVER"

READY = b"ready"
TAKE_OVER = b"take over"
FATAL = b"fatal "


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
                opened.append(Listener.inherit(fd, owns_queue=owns))
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
                # a Ctrl-C at the terminal reaches it as it reached us.
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
