"""Bytes queued for a connection without waiting, and the thread that writes them later.

A ``Group`` broadcast must not wait for any one client: a client that stops
reading would otherwise hold up every broadcaster for the whole write
timeout. So a broadcast hands each member's connection its bytes through
``Connection._queue``, which never blocks. The bytes go into the
connection's *outbox* (a deque of bytes objects, shared between members:
a broadcast to 500 members queues one bytes object 500 times, not 500
copies) and are written at once if the socket takes them, which it does
while the client keeps up.

Who writes what is left, when the socket was full:

- whoever holds the connection's write lock when it lets go (a
  ``sendall`` from any thread, a broadcaster, the flusher) looks at the
  outbox again; so does every writer before its own bytes (``sendall``
  first drains the outbox, which keeps the connection's bytes in the order
  they were handed over);
- otherwise the *flusher*: one thread for the whole process, which polls the
  sockets of connections whose socket was full and writes to each as it
  becomes writable. It starts when the first socket fills up, and ends as
  soon as no socket is full (so an idle process has no extra thread).

Every write happens under the connection's write lock, and only its holder
takes bytes off the front of the outbox, so bytes reach the wire in order
and never interleave with another ``sendall``'s. The flusher only ever
*tries* the lock: if a ``sendall`` holds it (it may be waiting for a slow
client), the flusher leaves that connection to it.

A connection whose outbox makes no progress for its write timeout is cut
off by the flusher, as a ``sendall`` that makes no progress would be.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._connection import Connection

logger = logging.getLogger("threadserve")

#: Queued items are joined into sends of about this size, so a client that
#: fell behind by many short lines catches up in few system calls.
BATCH_BYTES = 64 * 1024
FLUSHER_NAME = "threadserve flusher"

_WRITABLE = select.POLLOUT | select.POLLHUP | select.POLLERR | select.POLLNVAL


class Outbox:
    """Bytes handed to a connection that its socket has not taken yet.

    ``lock`` guards ``items`` and ``size``; it is held only for a few
    list operations, never across a system call that can wait.
    """

    __slots__ = ("items", "lock", "partial", "size", "stalled_since", "watched")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: deque[bytes | memoryview] = deque()
        self.size = 0  # Bytes in items.
        # The first item is partly on the wire already: nothing else (a
        # cut-off notice) may be written before its end.
        self.partial = False
        self.watched = False  # The flusher waits for this socket to take more.
        self.stalled_since = 0.0  # When the flusher started waiting (monotonic).

    def take_batch(self) -> bytes | memoryview | None:
        """The front of the queue, short items joined up to BATCH_BYTES (None: empty)."""
        with self.lock:
            items = self.items
            if not items:
                return None
            first = items[0]
            if len(items) == 1 or len(first) >= BATCH_BYTES:
                return first
            batch = [items.popleft()]
            length = len(first)
            while items and length + len(items[0]) <= BATCH_BYTES:
                item = items.popleft()
                batch.append(item)
                length += len(item)
            joined = b"".join(batch)
            items.appendleft(joined)
            return joined

    def consumed(self, sent: int) -> None:
        """``sent`` bytes of the front item (as take_batch returned it) are on the wire."""
        with self.lock:
            front = self.items[0]
            if sent >= len(front):
                self.items.popleft()
                self.partial = False
            else:
                self.items[0] = memoryview(front)[sent:]
                self.partial = True
            self.size -= sent

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.size = 0


class Flusher:
    """The process's one thread that writes outboxes whose sockets were full."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, Connection] = {}  # By socket descriptor.
        self._changed = True  # The poll set must be rebuilt.
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1

    def watch(self, conn: Connection) -> None:
        """Write ``conn``'s outbox once its socket takes more (the caller set outbox.watched)."""
        with self._lock:
            self._watched[conn._fd] = conn
            self._changed = True
            if self._thread is None:
                self._wake_r, self._wake_w = os.pipe()
                os.set_blocking(self._wake_r, False)
                os.set_blocking(self._wake_w, False)
                self._thread = threading.Thread(target=self._run, name=FLUSHER_NAME, daemon=True)
                self._thread.start()
            else:
                self._wake()

    def unwatch(self, conn: Connection) -> None:
        """Forget ``conn`` (it is closing); must happen before its descriptor is closed."""
        with self._lock:
            if self._watched.get(conn._fd) is conn:
                del self._watched[conn._fd]
                self._changed = True
                self._wake()

    def running(self) -> bool:
        """Whether the flusher thread is alive (tests wait for it to end)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def thread(self) -> threading.Thread | None:
        return self._thread

    def _wake(self) -> None:
        # The caller holds the lock, so the pipe is open. A full pipe already wakes.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        poller = select.poll()
        registered: set[int] = set()
        while True:
            with self._lock:
                if not self._watched:
                    # Nothing left to write: end, so an idle process keeps no thread.
                    os.close(self._wake_r)
                    os.close(self._wake_w)
                    self._wake_r = self._wake_w = -1
                    self._thread = None
                    return
                if self._changed:
                    self._changed = False
                    poller = select.poll()
                    poller.register(self._wake_r, select.POLLIN)
                    registered = set(self._watched)
                    for fd in registered:
                        poller.register(fd, _WRITABLE)
                timeout = self._next_timeout()
                wake_r = self._wake_r
            events = poller.poll(timeout)
            for fd, _mask in events:
                if fd == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                    continue
                with self._lock:
                    conn = self._watched.pop(fd, None)
                    self._changed = True
                if conn is not None:
                    self._write(conn)
            self._cut_off_stalled()

    def _next_timeout(self) -> int | None:
        """Milliseconds until the first watched connection's write timeout ends (lock held)."""
        first: float | None = None
        for conn in self._watched.values():
            limit = conn._timeouts.write
            outbox = conn._outbox
            if limit is None or outbox is None:
                continue
            ends = outbox.stalled_since + limit
            first = ends if first is None else min(first, ends)
        if first is None:
            return None
        return max(0, int((first - time.monotonic()) * 1000) + 1)

    def _write(self, conn: Connection) -> None:
        outbox = conn._outbox
        if outbox is None:
            return
        outbox.watched = False
        try:
            conn._kick()
        except Exception:  # Never let one connection end the thread that serves all.
            logger.exception("writing queued bytes to %s failed", conn.peer)

    def _cut_off_stalled(self) -> None:
        now = time.monotonic()
        stalled = []
        with self._lock:
            for fd, conn in list(self._watched.items()):
                limit = conn._timeouts.write
                outbox = conn._outbox
                if limit is not None and outbox is not None and now - outbox.stalled_since >= limit:
                    del self._watched[fd]
                    self._changed = True
                    stalled.append((conn, limit))
        for conn, limit in stalled:
            conn._cut_off(None, f"{conn.peer} took no queued data for {limit} s")


#: The one flusher of this process.
flusher = Flusher()
