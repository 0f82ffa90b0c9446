"""A responder for HAProxy's ``agent-check``: ``up ready`` while serving, ``drain`` before a stop.

HAProxy's agent check connects to a port of the server's choosing, reads one
line and closes. ``drain`` sets the server's weight to 0: HAProxy stops sending
it new clients while the ones it has keep being served, which is what a
rolling restart needs. ``up ready`` puts it back in rotation with its
configured weight. (HAProxy's ``check`` alone would only notice a stopping
server once it refuses connections, and clients sent to it in between are
told goodbye unserved.)

With workers (see _supervisor.py) the supervisor answers, not the workers;
an upgrade (SIGUSR2) hands the agent's socket to the new supervisor like
the listening sockets, so the address never stops answering.

The responder costs one thread that sleeps in ``select`` on its listening
socket and a pipe that wakes it to close. Each client gets its line from that
thread without blocking: the line fits any empty send buffer.

Closing without a reset: HAProxy may send a string first (``agent-send``),
and it may reach us before or after our answer. Closing a socket that holds
unread bytes makes Linux answer with a reset, which can destroy the answer
before the checker reads it. So, like every connection of the project, a
check ends with a lingering close: answer, FIN (``SHUT_WR``), then the socket
stays in the same ``select`` and what arrives is read and dropped until the
checker's EOF, or ``LINGER`` seconds, or ``DISCARD_LIMIT`` bytes (a checker
that sends more than that is not HAProxy; it gets the reset). At most
``MAX_LINGERING`` checks linger at once; past that the oldest is closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ._exceptions import ConfigurationError
from ._listeners import Listener, open_listeners, parse_bind_address

logger = logging.getLogger("threadserve")

UP = b"up ready\n"
DRAIN = b"drain\n"
#: What a checker may send (HAProxy's ``agent-send``, before or after our
#: answer) is read and dropped up to this many bytes per check: closing with
#: unread input would reset the connection instead.
DISCARD_LIMIT = 4096
#: How long an answered check waits for the checker's EOF before it closes.
LINGER = 2.0
#: Answered checks waiting for their EOF at once; past this the oldest closes.
MAX_LINGERING = 256


@dataclass
class _Lingering:
    """An answered check waiting for the checker's EOF."""

    sock: socket.socket
    until: float
    dropped: int = 0
    answered: bool = False


class AgentResponder:
    """Answers HAProxy agent checks on ``bind`` (``HOST:PORT``, ``[IPV6]:PORT`` or ``unix:PATH``).

    Binding happens here, so a bad or busy address fails at once with a
    ``BindError`` or ``ConfigurationError``. ``start()`` begins answering;
    ``draining`` switches the answer; ``close()`` stops the thread and
    closes the socket. ``listeners``: sockets inherited already listening
    (an upgrade's), instead of binding ``bind``.
    """

    def __init__(self, bind: str, *, listeners: list[Listener] | None = None) -> None:
        if listeners is None:
            try:
                address = parse_bind_address(bind)
            except ConfigurationError as exc:  # Say which of the server's addresses is bad.
                raise ConfigurationError(f"agent-check address (--agent-bind): {exc}") from None
            listeners = open_listeners([address])
        self._listeners: list[Listener] = listeners
        self.addresses = [listener.address for listener in self._listeners]
        self._wake_r, self._wake_w = os.pipe()
        self._draining = False
        self._thread: threading.Thread | None = None
        # Answered checks in their lingering close, oldest first (the
        # responder's thread alone touches it).
        self._lingering: OrderedDict[int, _Lingering] = OrderedDict()
        # Counts for tests and logs: checks answered; checks that ended with
        # the checker's EOF (or its own reset); checks closed before that
        # (linger over, too many bytes or checks, responder closing), the
        # only ones that may have reset the checker.
        self.answered = 0
        self.closed_clean = 0
        self.closed_early = 0

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def lingering(self) -> int:
        """Answered checks still waiting for the checker's EOF."""
        return len(self._lingering)

    def drain(self) -> None:
        """From now on, answer ``drain``: the load balancer sends no new clients."""
        self._draining = True

    def ready(self) -> None:
        """Answer ``up ready`` again."""
        self._draining = False

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the agent responder is already running")
        self._thread = threading.Thread(
            target=self._run, name=f"threadserve agent {self.addresses[0]}", daemon=True
        )
        self._thread.start()

    def filenos(self) -> list[int]:
        """The listening descriptors (to hand over to a new supervisor)."""
        return [listener.fileno() for listener in self._listeners]

    def close(self, timeout: float = 1.0, *, handed_over: bool = False) -> None:
        """Stop answering; a check that connects afterwards is refused.

        ``handed_over``: another process answers on the same sockets now;
        only this process's descriptors close (a Unix socket's file stays).
        """
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # Leave its descriptors to it rather than pull them from under it.
        for listener in self._listeners:
            if handed_over:
                listener.socket.close()
            else:
                listener.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ, None)
            for listener in self._listeners:
                selector.register(listener.socket, selectors.EVENT_READ, listener)
            try:
                while True:
                    for key, _events in selector.select(self._next_timeout()):
                        if key.data is None:
                            return
                        if isinstance(key.data, Listener):
                            self._answer_all(selector, key.data)
                        else:
                            self._discard(selector, key.data)
                    self._expire(selector, time.monotonic())
            finally:
                for entry in list(self._lingering.values()):
                    self._end(selector, entry, clean=False)

    def _next_timeout(self) -> float | None:
        if not self._lingering:
            return None
        oldest = next(iter(self._lingering.values()))
        return max(0.0, oldest.until - time.monotonic())

    def _answer_all(self, selector: selectors.BaseSelector, listener: Listener) -> None:
        while True:
            try:
                sock, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("agent check on %s: accept failed: %s", listener.address, exc)
                return
            sock.setblocking(False)
            entry = _Lingering(sock, time.monotonic() + LINGER)
            if not self._answer(entry):
                # The checker left already (HAProxy resets as soon as it has
                # read the answer): nothing of ours can reset it now.
                if entry.answered:
                    self.closed_clean += 1
                sock.close()
                continue
            if len(self._lingering) >= MAX_LINGERING:
                self._end(selector, next(iter(self._lingering.values())), clean=False)
            self._lingering[sock.fileno()] = entry
            selector.register(sock, selectors.EVENT_READ, entry)

    def _answer(self, entry: _Lingering) -> bool:
        """Read what the checker sent so far, answer, send FIN; False if the checker left."""
        sock = entry.sock
        try:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                entry.dropped += len(sock.recv(DISCARD_LIMIT))
            sock.send(DRAIN if self._draining else UP)
            # Counted before the EOF goes out: a checker that has read the
            # whole answer then sees it counted.
            self.answered += 1
            entry.answered = True
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        return True

    def _discard(self, selector: selectors.BaseSelector, entry: _Lingering) -> None:
        """Read and drop what the checker sends after the answer; end at its EOF."""
        try:
            data = entry.sock.recv(DISCARD_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # The checker reset: it has what it wanted.
        entry.dropped += len(data)
        if not data:
            self._end(selector, entry, clean=True)
        elif entry.dropped > DISCARD_LIMIT:
            logger.warning("agent check: the checker sent over %d bytes; closed", DISCARD_LIMIT)
            self._end(selector, entry, clean=False)

    def _expire(self, selector: selectors.BaseSelector, now: float) -> None:
        while self._lingering:
            oldest = next(iter(self._lingering.values()))
            if oldest.until > now:
                return
            self._end(selector, oldest, clean=False)

    def _end(self, selector: selectors.BaseSelector, entry: _Lingering, *, clean: bool) -> None:
        if clean:
            self.closed_clean += 1
        else:
            self.closed_early += 1
        self._lingering.pop(entry.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(entry.sock)
        entry.sock.close()
