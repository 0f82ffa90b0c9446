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
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading

from ._listeners import Listener, open_listeners, parse_bind_address

logger = logging.getLogger("threadserve")

UP = b"up ready\n"
DRAIN = b"drain\n"
#: Bytes an agent may send first (HAProxy's ``agent-send``) are read and
#: dropped: closing with unread input would reset the connection instead.
_DISCARD_LIMIT = 4096


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
            listeners = open_listeners([parse_bind_address(bind)])
        self._listeners: list[Listener] = listeners
        self.addresses = [listener.address for listener in self._listeners]
        self._wake_r, self._wake_w = os.pipe()
        self._draining = False
        self._thread: threading.Thread | None = None
        self.answered = 0  # Agent checks answered so far (for tests and logs).

    @property
    def draining(self) -> bool:
        return self._draining

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
            while True:
                for key, _events in selector.select():
                    if key.data is None:
                        return
                    self._answer_all(key.data)

    def _answer_all(self, listener: Listener) -> None:
        while True:
            try:
                sock, _address = listener.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("agent check on %s: accept failed: %s", listener.address, exc)
                return
            try:
                self._answer(sock)
            finally:
                sock.close()

    def _answer(self, sock: socket.socket) -> None:
        try:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                sock.recv(_DISCARD_LIMIT, socket.MSG_DONTWAIT)
            sock.send(DRAIN if self._draining else UP, socket.MSG_DONTWAIT)
            # Counted before the EOF goes out: a checker that has read the
            # whole answer then sees it counted.
            self.answered += 1
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return  # The checker already left.
