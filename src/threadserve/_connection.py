"""What a handler holds: one client connection, read and written with blocking calls.

The socket underneath is non-blocking. Every wait for data is a ``poll`` on two
descriptors: the client socket and a stop descriptor (an eventfd shared by a
group of connections, see _broadcast.py), which the server makes readable
for good when it starts stopping. That is how a
handler blocked in ``recv`` wakes up at stop time *without* touching the
client socket: ``shutdown(SHUT_RD)`` would wake it too, but on Linux a socket
that has shut its read side answers every later byte from the client with a
reset, which rules out the lingering close the stop contract needs. CPython
itself pays the same poll-then-recv on any socket with a timeout, and we need
timeouts anyway.

The usual wait-and-read (no TLS; an idle, lifetime or frame deadline at
most) may be done by the compiled ``_fastread.c`` in one release of the GIL; it
must then end reading for the stop exactly as the Python path does,
including a stop that began while the read waited (see ``_read_chunk``).

Writes try ``send`` first (the socket buffer is usually free) and only poll
when the client is not reading. The stop descriptor is deliberately *not* part of a
write's wait: data a handler has read must still be answered while the server
drains. A forced stop ``shutdown(SHUT_RDWR)``s the socket, which wakes both.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import functools
import logging
import select
import socket
import ssl
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from ._accel import poll_recv as _poll_recv
from ._cancel import CancelCallback, CancelToken
from ._exceptions import (
    ConnectionClosed,
    FrameTooLarge,
    HandshakeTimeout,
    IncompleteRead,
    ReadTimeout,
    WriteTimeout,
)
from ._outbox import Outbox, flusher
from ._proxy import ProxyDetails
from ._timeouts import Timeouts
from ._writelock import WriteLock

logger = logging.getLogger("threadserve")

DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_LINE_LIMIT = 64 * 1024
#: How long closing waits for a writer in another thread to let go once its socket is shut.
CLOSE_LOCK_WAIT = 5.0

# What a non-blocking call raises when it must wait; TLS adds its own two.
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR | select.POLLNVAL
_WRITABLE = select.POLLOUT | select.POLLHUP | select.POLLERR | select.POLLNVAL

#: What one read returns: bytes from recv, a count from recv_into.
_Read = TypeVar("_Read", bytes, int)

_OUTBOX_MAKING = threading.Lock()

#: What a closing hook is called with: the connection, and when it must be done (monotonic).
ClosingHook = Callable[["Connection", float], None]

#: Takes a told socket (FIN sent) over to wait for its client's EOF until a
#: time (monotonic); True if it did, and will close it.
LingerElsewhere = Callable[[socket.socket, float], bool]

#: Errors that mean "the other side is gone"; they end a connection quietly.
PEER_GONE_ERRNOS = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN, errno.ETIMEDOUT}
)


class Connection:
    """One client connection, owned by the server and lent to a handler.

    Reads return ``b""`` at end of stream: when the client closed its side, or
    when the server is stopping and every byte that had already arrived has
    been returned. Iterating yields received chunks until then. The server
    closes the connection after the handler returns, whatever the handler did.

    Threads: ``sendall`` may be called from any thread, at the same time as
    the handler's own reads and writes (a chat server writes each line to
    every other client from the sender's thread). Each call's bytes reach the
    wire whole, never interleaved with another call's: writes take a
    per-connection lock, and a call that must wait for a slow client waits
    holding it, so others queue behind it (each for at most its own write
    timeout of no progress, as always). Reads (``recv``, ``recv_into``,
    ``readline``, ``readexactly``, iteration, ``unread``) belong to the
    thread running the handler and are not checked: two threads reading one
    connection would split its bytes between them unpredictably. Nor may a
    read outlive the handler: the server closes the socket when the handler
    returns, and a read still waiting then may wake on whatever the kernel
    has since given that descriptor number. To send to many connections
    without waiting for any one of them, use a ``Group``.

    Writes end with the connection. Once the server has begun its goodbye
    (after the handler returned, or at stop) the notice is the last thing
    written: a ``sendall`` from another thread from then on, or after the
    connection is closed, raises ``ConnectionClosed`` (a ``BrokenPipeError``),
    and one already under way finishes before the notice.

    Error handling: a client that resets or vanishes raises the builtin
    ``ConnectionResetError``/``BrokenPipeError``; a deadline raises
    ``ReadTimeout``/``WriteTimeout`` (both ``TimeoutError``). A handler may let
    all of these propagate: the server closes the connection and gives the
    reason in its "connection closed" log line, without a traceback.
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        *,
        stop_fd: int,
        timeouts: Timeouts,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        clock: Callable[[], float] = time.monotonic,
        client_ip: str | None = None,
        stop_group: int = 0,
        stop_begun: threading.Event | None = None,
    ) -> None:
        self.peer = peer
        # Behind a load balancer speaking the PROXY protocol: the proxy's own
        # address and what its header said; ``peer`` is then the client it reports.
        self.proxy: ProxyDetails | None = None
        self._client_ip = client_ip  # For per-address admission counts.
        self._stop_group = stop_group  # Which stop broadcast group wakes this connection.
        self.cancel_token = CancelToken()
        self.bytes_received = 0
        self.bytes_sent = 0
        self._sock: socket.socket = sock
        self._tls = False
        self._tls_established = False
        self._fd = sock.fileno()
        self._stop_fd = stop_fd
        # Set once the server begins to stop, before any stop descriptor is.
        # A busy connection finds its socket readable and never waits for its
        # descriptor: this flag makes it wind down at its next read instead of
        # serving on until its group's wave comes.
        self._stop_begun = stop_begun if stop_begun is not None else threading.Event()
        self._timeouts = timeouts
        self._chunk_size = chunk_size
        self._clock = clock
        self.opened_at = clock()
        self._lifetime_deadline = (
            None if timeouts.lifetime is None else self.opened_at + timeouts.lifetime
        )
        # Bytes taken from the socket but not yet handed out (readline/readexactly).
        self._buffer = bytearray()
        self._read_poller = select.poll()
        self._read_poller.register(self._fd, _READABLE)
        self._read_poller.register(stop_fd, select.POLLIN)
        self._poll_readable = self._read_poller.poll
        # Reads with no TLS buffer to consult (TLS, and the close, turn it off).
        self._plain_reads = True
        # Whether a read waiting for the next bytes has a deadline to compute.
        self._idle_deadlines = timeouts.idle is not None or timeouts.lifetime is not None
        self._write_poller: select.poll | None = None
        # Held by whoever writes to the socket, so writes from several
        # threads never interleave, and by the goodbye, so nothing follows it.
        self._write_lock = WriteLock()
        # Why sendall now raises ConnectionClosed (None: writes go through).
        self._write_closed: str | None = None
        # Set when a Group cut this client off for not reading: its reads then end.
        self._cut_reason: str | None = None
        # Bytes queued by a Group that the socket has not taken yet (see _outbox.py);
        # made on the first join, so connections outside groups pay nothing.
        self._outbox: Outbox | None = None
        # Called at the start of the close, before the goodbye (Group membership).
        self._closing_hooks: list[ClosingHook] = []
        self._peer_eof = False  # The client sent FIN.
        # Once the stop is seen: how many more bytes to read (those that had
        # already arrived), then end of stream.
        self._stop_budget: int | None = None
        self._lingering = False  # In the lingering close: notice and FIN already sent.
        self._reading_done = False  # Reads return b"" from now on (EOF or stop).

    # ------------------------------------------------------------------ state

    @property
    def cancelled(self) -> bool:
        """True once the server has asked this connection to wind down."""
        return self.cancel_token.cancelled

    def on_cancel(self, callback: CancelCallback) -> Callable[[], None]:
        """Run ``callback`` when the connection is cancelled; returns an unregister function.

        Use it to interrupt blocking work that is not a read on this
        connection (close a database cursor, put a sentinel on a queue). At
        stop, callbacks run one after another on the server's hook thread:
        keep them short; one that blocks delays the callbacks after it (and
        is reported when the stop ends), never the stop itself.
        """
        return self.cancel_token.on_cancel(callback)

    @property
    def local_address(self) -> str:
        from ._listeners import format_address

        return format_address(self._sock.family, self._sock.getsockname())

    @property
    def at_eof(self) -> bool:
        """True once reads return ``b""`` (client EOF or server stop)."""
        return self._reading_done and not self._buffer

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "open"
        return f"<Connection {self.peer} {state} in={self.bytes_received} out={self.bytes_sent}>"

    # ------------------------------------------------------------------ reading

    def recv(self, bufsize: int = DEFAULT_CHUNK_SIZE) -> bytes:
        """Return up to ``bufsize`` bytes, blocking until some arrive; ``b""`` at end of stream."""
        if self._buffer:
            data = bytes(self._buffer[:bufsize])
            del self._buffer[:bufsize]
            return data
        if bufsize <= 0:
            return b""  # As socket.recv(0): nothing asked, nothing read, not the end.
        return self._read_chunk(bufsize, self._idle_deadline() if self._idle_deadlines else None)

    def _read_chunk(self, bufsize: int, deadline: float | None) -> bytes:
        """Up to ``bufsize`` bytes from the socket itself, past the buffer, by ``deadline``.

        The hot path for plain TCP (``recv``, iteration, and ``readline`` and
        ``readexactly`` through ``_read_frame_part``); the general path otherwise.
        """
        # The hot path: one poll, one recv. Anything unusual (the stop,
        # spurious readiness, a deadline reached) falls through to the general
        # path below, which raises the timeout.
        if self._plain_reads and self._stop_budget is None and not self._reading_done:
            timeout_ms = -1 if deadline is None else self._ms_until(deadline)
            if not timeout_ms:
                pass  # The deadline has passed: the general path raises the timeout.
            elif _poll_recv is not None:
                # Compiled (_fastread.c): both calls in one release of the GIL.
                result = _poll_recv(self._fd, self._stop_fd, bufsize, timeout_ms)
                if type(result) is bytes:
                    if result:
                        self.bytes_received += len(result)
                        # The stop may have begun while this read waited (before
                        # this connection's descriptor fired): from now on, read
                        # only what had arrived, as the general path would.
                        if self._stop_begun.is_set():
                            self._stop_budget = queued_bytes(self._fd)
                    else:
                        self._mark_eof()
                    return result
                if result is not None and not self._stop_reading_after(result == 1):
                    return b""
            else:
                events = self._poll_readable(timeout_ms)
                # Inlined _only_socket_ready and _count_received: this runs once
                # per message, and each Python call here is a measurable share.
                if len(events) == 1 and events[0][0] == self._fd and not self._stop_begun.is_set():
                    try:
                        chunk = self._sock.recv(bufsize)
                    except _WOULD_BLOCK:
                        pass  # Spurious readiness: the general path waits again.
                    else:
                        if chunk:
                            self.bytes_received += len(chunk)
                        else:
                            self._mark_eof()
                        return chunk
                # The stop: these events say what had arrived by then, so an idle
                # connection ends here, without a second poll (at a stop of
                # thousands, every system call waits for the GIL once more).
                # No events: the deadline passed, for the general path to raise.
                elif events and not self._readable_after(events):
                    return b""
        return self._recv_from_socket(bufsize, deadline)

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        """Like ``socket.recv_into``: fill ``buffer``, return the count; 0 at end of stream."""
        view = memoryview(buffer).cast("B")
        wanted = nbytes or len(view)
        if not wanted:
            return 0  # An empty buffer reads nothing; that is not the end of the stream.
        if self._buffer:
            count = min(wanted, len(self._buffer))
            view[:count] = self._buffer[:count]
            del self._buffer[:count]
            return count
        read = functools.partial(self._sock.recv_into, view, wanted)
        return self._read_when_ready(self._idle_deadline(), read, int) or 0

    def __iter__(self) -> Iterator[bytes]:
        """Yield chunks as they arrive, until end of stream (client EOF or server stop)."""
        size = self._chunk_size
        while True:
            # recv(), without its call when nothing is buffered: this runs once per message.
            if self._buffer:
                chunk = self.recv(size)
            else:
                chunk = self._read_chunk(
                    size, self._idle_deadline() if self._idle_deadlines else None
                )
            if not chunk:
                return
            yield chunk

    def readline(self, limit: int = DEFAULT_LINE_LIMIT) -> bytes:
        """Return one line, newline included.

        At end of stream a last unterminated line is returned as it is, then
        ``b""``. A line longer than ``limit`` bytes raises ``FrameTooLarge``
        after reading at most ``limit`` plus one chunk, so memory stays bounded.
        """
        scanned = 0
        frame_deadline: float | None = None
        while True:
            end = self._buffer.find(b"\n", scanned)
            if end >= 0:
                if end + 1 > limit:
                    raise FrameTooLarge(limit)
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > limit:
                raise FrameTooLarge(limit)
            scanned = len(self._buffer)
            if self._buffer and frame_deadline is None:
                frame_deadline = self._frame_deadline()
            chunk = self._read_frame_part(self._chunk_size, frame_deadline)
            if not chunk:
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            self._buffer += chunk

    def readexactly(self, n: int, limit: int | None = None) -> bytes:
        """Return exactly ``n`` bytes; raise ``IncompleteRead`` (with the bytes) if the stream ends.

        ``limit`` rejects a frame size the handler read from the wire before
        any memory is committed to it.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        if limit is not None and n > limit:
            raise FrameTooLarge(limit)
        frame_deadline: float | None = None
        while len(self._buffer) < n:
            if self._buffer and frame_deadline is None:
                frame_deadline = self._frame_deadline()
            chunk = self._read_frame_part(
                max(self._chunk_size, n - len(self._buffer)), frame_deadline
            )
            if not chunk:
                partial = bytes(self._buffer)
                self._buffer.clear()
                raise IncompleteRead(partial, n)
            self._buffer += chunk
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def unread(self, data: bytes) -> None:
        """Push bytes back so the next read returns them first (for protocol sniffing)."""
        self._buffer[:0] = data

    # ------------------------------------------------------------------ writing

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Send every byte, blocking while the client is slow to read. Safe from any thread.

        Raises ``WriteTimeout`` when the client takes no byte for the
        ``write`` timeout, the builtin connection errors if it is gone, and
        ``ConnectionClosed`` once the connection takes no more writes (closed,
        or the server's goodbye has begun).
        """
        lock = self._write_lock
        # The lock taken inline (see _writelock.py): this runs once per reply.
        try:
            lock.free.pop()
        except IndexError:
            lock.acquire()  # Another thread is writing: wait for its turn to end.
        try:
            if self._write_closed is not None:
                raise ConnectionClosed(self._write_closed)
            outbox = self._outbox  # None unless a Group joined.
            if outbox is not None and outbox.size:
                self._drain_outbox()  # Bytes a Group queued earlier go first.
            total = len(data) if type(data) is bytes else memoryview(data).nbytes
            try:
                sent = self._sock.send(data)  # Usually all of it: the send buffer is free.
            except _WOULD_BLOCK:
                sent = 0
            if sent < total:
                view = memoryview(data).cast("B")
                while sent < total:
                    self._wait_writable()
                    sent += self._send_some(view[sent:])
            self.bytes_sent += total
        finally:
            lock.free.append(True)
            if lock.waiters:
                lock.wake_one()
        # A Group may have queued bytes while we held the lock (see _outbox.py).
        if outbox is not None and outbox.size:
            self._kick()

    # ------------------------------------------------------------------ queued writes (Group)

    def _join_outbox(self) -> Outbox:
        """This connection's outbox, made on first use."""
        outbox = self._outbox
        if outbox is None:
            with _OUTBOX_MAKING:  # Two groups joining at once make one outbox.
                outbox = self._outbox
                if outbox is None:
                    outbox = self._outbox = Outbox()
        return outbox

    def _queue(self, data: bytes, limit: int) -> bool:
        """Hand ``data`` over without waiting: sent now if the socket takes it, else queued.

        Returns False, queueing nothing, if the queue would then hold more
        than ``limit`` bytes. Raises ``ConnectionClosed`` once writes are closed.
        """
        outbox = self._join_outbox()
        with outbox.lock:
            if self._write_closed is not None:
                raise ConnectionClosed(self._write_closed)
            size = outbox.size
            if size + len(data) > limit:
                return False
            outbox.items.append(data)
            outbox.size = size + len(data)
        if not size:  # Otherwise whoever writes the queue's front writes this too.
            self._kick()
        return True

    def _kick(self) -> None:
        """Write queued bytes now if the write lock is free; leave a full socket to the flusher."""
        outbox = self._outbox
        if outbox is None:
            return
        lock = self._write_lock
        # Looping: bytes queued while we held the lock had no one else to write them.
        while outbox.size and not outbox.watched:
            if not lock.try_acquire():
                return  # Its holder looks at the queue again when it lets go.
            try:
                full = self._flush_nowait()
            except OSError as exc:  # The client is gone; its own thread will see why.
                self._write_closed = self._write_closed or f"write failed: {exc}"
                outbox.clear()
                return
            finally:
                lock.release()
            if full:
                with outbox.lock:
                    if outbox.watched:
                        return
                    outbox.watched = True
                    outbox.stalled_since = self._clock()
                flusher.watch(self)
                return

    def _flush_nowait(self) -> bool:
        """Send queued bytes (write lock held) until none are left (False) or the socket is full."""
        outbox = self._outbox
        assert outbox is not None
        while (batch := outbox.take_batch()) is not None:
            try:
                sent = self._sock.send(batch)
            except _WOULD_BLOCK:
                return True
            self.bytes_sent += sent
            outbox.consumed(sent)
            if sent < len(batch):
                return True
        return False

    def _drain_outbox(self) -> None:
        """Send every queued byte, waiting for the client (write lock held)."""
        while self._flush_nowait():
            self._wait_writable()

    def _cut_off(self, notice: bytes | None, reason: str) -> None:
        """End a client that does not keep up: drop its queue, try the notice, shut the socket.

        Never waits. The notice goes out only if the socket takes it at once
        and no write is half done. The shutdown wakes the handler's read,
        which then raises ``WriteTimeout`` with ``reason``; every later write
        raises ``ConnectionClosed``.
        """
        outbox = self._join_outbox()
        with outbox.lock:
            if self._write_closed is not None:
                return
            self._write_closed = self._cut_reason = reason
            outbox.items.clear()
            outbox.size = 0
            half_written = outbox.partial
        if notice and not half_written and self._write_lock.try_acquire():
            try:
                with contextlib.suppress(OSError):  # _WOULD_BLOCK included.
                    self._sock.send(notice)
            finally:
                self._write_lock.release()
        self._force_close()

    def _add_closing_hook(self, hook: ClosingHook) -> None:
        self._closing_hooks.append(hook)

    def _remove_closing_hook(self, hook: ClosingHook) -> None:
        with contextlib.suppress(ValueError):
            self._closing_hooks.remove(hook)

    def _run_closing_hooks(self, deadline: float) -> None:
        hooks, self._closing_hooks = self._closing_hooks, []
        for hook in hooks:
            try:
                hook(self, deadline)
            except Exception:
                logger.exception("closing hook %r failed for %s", hook, self.peer)

    def _stop_writes(self, why: str) -> None:
        """From now on sendall raises ConnectionClosed; queued bytes are the closer's to write."""
        if self._write_closed is None:
            self._write_closed = why

    def _send_some(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self._sock.send(data)
        except _WOULD_BLOCK:
            return 0

    def _wait_writable(self) -> None:
        if self._write_poller is None:
            self._write_poller = select.poll()
            self._write_poller.register(self._fd, _WRITABLE)
        write_timeout = self._timeouts.write
        deadline = self._earliest(None if write_timeout is None else self._clock() + write_timeout)
        if not self._write_poller.poll(self._poll_timeout_ms(deadline)):
            raise WriteTimeout(f"{self.peer} took no data for {write_timeout} s")

    # ------------------------------------------------------------------ internals

    def _recv_from_socket(self, bufsize: int, deadline: float | None) -> bytes:
        data = self._read_when_ready(deadline, functools.partial(self._sock.recv, bufsize), len)
        return b"" if data is None else data

    def _read_when_ready(
        self, deadline: float | None, read: Callable[[], _Read], size: Callable[[_Read], int]
    ) -> _Read | None:
        """Wait for input, then ``read()`` it once; None once reading has ended (EOF or stop)."""
        while self._ready_to_read(deadline):
            try:
                result = read()
            except _WOULD_BLOCK:
                if self._stop_budget is not None:
                    # Stopping, and what had arrived is read. (With TLS the
                    # budget counts encrypted bytes, so it may never reach 0.)
                    self._end_reading_for_stop()
                    return None
                # poll() can report readiness that recv() then disagrees with
                # (a bad checksum dropped the segment, or a TLS record is not
                # complete yet); wait again.
                continue
            self._count_received(size(result))
            return result
        return None

    def _ready_to_read(self, deadline: float | None) -> bool:
        if self._reading_done:
            return False
        # TLS may hold decrypted bytes the kernel no longer reports as readable.
        if self._tls and self._sock.pending():  # type: ignore[attr-defined]
            return True
        return self._wait_readable(deadline)

    def _wait_readable(self, deadline: float | None) -> bool:
        """Block until the socket is readable (True) or the server stops with nothing to read."""
        if self._stop_budget is not None:
            return self._stop_budget > 0 or self._end_reading_for_stop()
        # Deadlines are absolute: a client sending a byte now and then must
        # not keep one alive past its end just because poll() finds data.
        if deadline is not None and self._clock() >= deadline:
            raise self._read_timed_out(deadline)
        events = self._read_poller.poll(self._poll_timeout_ms(deadline))
        if not events:
            raise self._read_timed_out(deadline)
        return self._readable_after(events)

    def _read_timed_out(self, deadline: float | None) -> ReadTimeout:
        """The timeout a read waiting until ``deadline`` met: lifetime or idle.

        A frame's own read deadline is told apart by ``_read_frame_part``,
        which alone knows it.
        """
        lifetime = self._lifetime_deadline
        if lifetime is not None and deadline is not None and deadline >= lifetime:
            return ReadTimeout(
                f"{self.peer} reached the end of its lifetime ({self._timeouts.lifetime:g} s)",
                "lifetime",
            )
        idle = self._timeouts.idle
        waited = "" if idle is None else f" for {idle:g} s"
        return ReadTimeout(f"no data from {self.peer}{waited}", "idle")

    def _readable_after(self, events: list[tuple[int, int]]) -> bool:
        """What a poll of the socket and the stop descriptor found: True if there is input."""
        if self._only_socket_ready(events):
            return True
        return self._stop_reading_after(any(fd == self._fd for fd, _mask in events))

    def _stop_reading_after(self, socket_ready: bool) -> bool:
        """The server is stopping: read only what had arrived. True if there is some."""
        # What the client had sent by now is still read and answered; what it
        # sends later is not, or a client that keeps sending would hold the
        # stop open until the grace period runs out.
        self._stop_budget = max(1, queued_bytes(self._fd)) if socket_ready else 0
        return self._stop_budget > 0 or self._end_reading_for_stop()

    def _only_socket_ready(self, events: list[tuple[int, int]]) -> bool:
        """Input to read and no stop: the usual case, served without further checks."""
        return len(events) == 1 and events[0][0] == self._fd and not self._stop_begun.is_set()

    def _end_reading_for_stop(self) -> bool:
        self._reading_done = True
        return False

    def _count_received(self, count: int) -> None:
        if not count:
            self._mark_eof()
            return
        self.bytes_received += count
        if self._stop_budget is not None:
            self._stop_budget -= count

    def _mark_eof(self) -> None:
        self._reading_done = True
        self._peer_eof = True
        if self._cut_reason is not None:  # Our shutdown ended the reads, not the client.
            raise WriteTimeout(self._cut_reason)

    def _idle_deadline(self) -> float | None:
        idle = self._timeouts.idle
        if idle is None:
            return self._lifetime_deadline
        return self._earliest(self._clock() + idle)

    def _frame_deadline(self) -> float | None:
        """When the frame that just started must be complete (None: no limit)."""
        read = self._timeouts.read
        return None if read is None else self._clock() + read

    def _read_frame_part(self, bufsize: int, frame_deadline: float | None) -> bytes:
        """The next chunk of a frame: within the idle timeout and the frame's own deadline."""
        deadline = self._idle_deadline() if self._idle_deadlines else None
        if frame_deadline is None or (deadline is not None and deadline <= frame_deadline):
            return self._read_chunk(bufsize, deadline)
        # The frame's deadline is the nearest (the lifetime's is never nearer
        # than the idle one), so a timeout here is the read timeout's.
        try:
            return self._read_chunk(bufsize, frame_deadline)
        except ReadTimeout:
            raise ReadTimeout(
                f"no complete line or frame from {self.peer} "
                f"within {self._timeouts.read:g} s (read timeout)",
                "read",
            ) from None

    def _earliest(self, deadline: float | None) -> float | None:
        lifetime = self._lifetime_deadline
        if deadline is None:
            return lifetime
        if lifetime is None:
            return deadline
        return min(deadline, lifetime)

    def _poll_timeout_ms(self, deadline: float | None) -> int | None:
        return None if deadline is None else self._ms_until(deadline)

    def _ms_until(self, deadline: float) -> int:
        """A poll timeout that ends at ``deadline``: 0 once it has passed."""
        remaining = deadline - self._clock()
        # Round up: waking a millisecond early would find the deadline not yet
        # passed, and wait (or report a timeout) too soon.
        return int(remaining * 1000) + 1 if remaining > 0 else 0

    # ------------------------------------------------------------------ TLS (server side)

    def _tls_handshake(self, context: ssl.SSLContext) -> None:
        """Wrap the socket and run the handshake in this thread, within the handshake timeout."""
        tls_sock = context.wrap_socket(self._sock, server_side=True, do_handshake_on_connect=False)
        self._sock = tls_sock
        self._tls = True
        self._plain_reads = False
        timeout = self._timeouts.handshake
        deadline = self._earliest(None if timeout is None else self._clock() + timeout)
        while True:
            try:
                tls_sock.do_handshake()
                self._tls_established = True
                return
            except ssl.SSLWantReadError:
                if self._stop_budget is not None:
                    readable = False  # The stop came mid-handshake: nothing to answer yet.
                else:
                    try:
                        readable = self._wait_readable(deadline)
                    except ReadTimeout:
                        raise HandshakeTimeout(
                            f"{self.peer} did not finish the TLS handshake in {timeout} s"
                        ) from None
                if not readable:
                    raise ConnectionAbortedError(
                        errno.ECONNABORTED, "server stopping during the TLS handshake"
                    ) from None
            except ssl.SSLWantWriteError:
                self._wait_writable()

    # ------------------------------------------------------------------ closing (server side)

    def _close_gracefully(
        self,
        notice: bytes | None,
        linger_until: float,
        linger_elsewhere: LingerElsewhere | None = None,
    ) -> None:
        """Say goodbye (if asked), send FIN, then read and discard until the client's EOF.

        Closing a socket that still holds unread bytes makes Linux send a
        reset, and the client may then lose replies it had not read yet. So,
        unless the client already closed its side, we shut down our writing
        side only and wait (until ``linger_until``) for the client to close.
        ``linger_elsewhere`` may take that wait over (the stop does, see
        _stop.py): once it returns True the socket is its to close.
        """
        handed_over = False
        # Group members leave here; until then, broadcasts still reach them.
        self._run_closing_hooks(linger_until)
        self._stop_writes("the server has said goodbye")
        try:
            # Under the write lock: a sendall from another thread already
            # under way finishes first; any later one raises ConnectionClosed.
            with self._write_lock:
                if self._cut_reason is None:
                    if self._outbox is not None:
                        self._drain_outbox()  # Queued before the goodbye: sent before it.
                    # No TLS session, no notice: the client could not decrypt it.
                    if notice and self._tls == self._tls_established:
                        self._sendall_locked(notice)
                    if self._tls_established:
                        self._send_close_notify()
                if not self._peer_eof:
                    self._sock.shutdown(socket.SHUT_WR)
            if not self._peer_eof:
                # Told and FIN sent: if the stop's deadline cuts this short,
                # it is still a clean drain (see _stop.py, step 5).
                self._lingering = True
                handed_over = (
                    linger_elsewhere is not None
                    and not self._tls
                    and linger_elsewhere(self._sock, linger_until)
                )
                if not handed_over:
                    self._discard_until_eof(linger_until)
        except (OSError, ValueError):
            # The client vanished or the stop was forced (ValueError: the TLS
            # layer is already gone): nothing more to tell it.
            pass
        finally:
            self._lingering = False
            self._forget_outbox()
            # The socket is closed here or, handed over, by the stop later: a
            # read after that must fail on the closed socket, not take the
            # compiled read on a descriptor number another client may have.
            self._plain_reads = False
            if not handed_over:
                self._sock.close()

    def _sendall_locked(self, data: bytes) -> None:
        """sendall's sending, for the closing path, which holds the write lock already."""
        view = memoryview(data)
        sent = 0
        while sent < len(data):
            count = self._send_some(view[sent:])
            if not count:
                self._wait_writable()
            sent += count
        self.bytes_sent += len(data)

    def _forget_outbox(self) -> None:
        """Drop what is still queued and stop the flusher watching (before the socket closes)."""
        outbox = self._outbox
        if outbox is not None:
            outbox.clear()
            flusher.unwatch(self)

    def _send_close_notify(self) -> None:
        tls_sock: ssl.SSLSocket = self._sock  # type: ignore[assignment]
        try:
            tls_sock.unwrap()
        except ssl.SSLWantReadError:
            pass  # Ours is sent; waiting for the client's close_notify is not needed.
        except ssl.SSLWantWriteError:
            self._wait_writable()
            with contextlib.suppress(ssl.SSLWantReadError):
                tls_sock.unwrap()

    def _discard_until_eof(self, until: float) -> None:
        poller = select.poll()
        poller.register(self._fd, _READABLE)
        while True:
            remaining = until - self._clock()
            if remaining <= 0 or not poller.poll(int(remaining * 1000) + 1):
                return
            try:
                if not self._sock.recv(DEFAULT_CHUNK_SIZE):
                    return
            except _WOULD_BLOCK:
                continue

    def _force_close(self) -> None:
        """Wake every blocked read and write at once (used after the grace period)."""
        # OSError: already closed or never connected, so nothing is left to wake.
        # socket.socket.shutdown, not SSLSocket.shutdown: the latter drops the
        # TLS layer, and the handler's next read would return ciphertext.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def _close_socket(self) -> None:
        """Close at once, with no goodbye (the client is gone, stalled, or was never served)."""
        self._run_closing_hooks(self._clock())
        self._stop_writes("the connection is closed")
        self._forget_outbox()
        lock = self._write_lock
        locked = lock.try_acquire()
        if not locked:
            # Another thread is writing, maybe waiting for this very client:
            # wake it (its send fails) rather than wait for its write timeout.
            self._force_close()
            locked = lock.acquire(timeout=CLOSE_LOCK_WAIT)
        try:
            self._plain_reads = False  # A later read fails on the closed socket.
            self._sock.close()
        finally:
            if locked:
                lock.release()


def queued_bytes(fd: int) -> int:
    """Bytes waiting in the kernel's receive queue for this socket (SIOCINQ)."""
    count = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, count, True)
    except OSError:
        return 0
    return count[0]
