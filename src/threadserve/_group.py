"""Groups: connections that hear each other's broadcasts, safe from a member that stops reading.

The policy for slow consumers
=============================

A broadcast never waits for a member. Each member's connection has a
bounded *outbox* (_outbox.py): a broadcast sends to the member at once when
its socket takes the bytes (the usual case, one ``send`` per member), and
otherwise queues them; the process's flusher thread writes them as the
member's socket drains. A member whose queue would go over ``max_queued``
bytes (1 MiB by default), or whose queue makes no progress for the
connection's write timeout, is *cut off*: its queue is dropped, it is sent
the ``cutoff_notice`` if its socket takes it at once (a client that reads
nothing rarely has room left), its socket is shut down, and it leaves the
group. Its handler's next read raises ``WriteTimeout``, so the server closes
it at once and logs it with reason ``write_timeout``.

Why a queue and not a short deadline per send: a deadline makes every
broadcaster wait for the slowest member (up to the deadline, once per
stall), and it cuts off a client that is only briefly slow, such as one
behind a congested link during a burst. A queue costs no broadcaster any
waiting, and absorbs bursts up to its bound.

Memory bound per member: at most ``max_queued`` bytes queued, plus what the
kernel's socket send buffer holds. The queue holds references: a broadcast
queued for 500 members is one bytes object, so many slow members cost far
less than ``max_queued`` each unless they fall behind by different data.

Ordering: each member receives broadcasts from one thread in the order that
thread made them, each whole. Broadcasts from different threads may reach
different members in different relative orders. A member's own
``sendall`` goes after whatever a broadcast already queued for it.

Stopping: a member leaves when its connection ends (its handler returned and
the server closes it). At stop, a member first waits (until shortly before
the grace deadline at most) for the other members the same stop woke with it
or before it to finish reading, so that lines they had read before the stop
and broadcast while draining still reach it; then it leaves, its queue is
written, and only then the goodbye notice. Nothing is written to a member
after its notice: a broadcast reaching a member whose goodbye has begun
simply skips it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from ._checks import MAX_QUEUED, check_type
from ._connection import Connection
from ._exceptions import ConnectionClosed

logger = logging.getLogger("threadserve")

DEFAULT_MAX_QUEUED = 1024 * 1024
DEFAULT_CUTOFF_NOTICE = b"Too slow: disconnected\n"


class Group:
    """A set of connections that ``broadcast`` writes to without waiting for any one of them.

    ``join`` and ``leave`` may be called from any thread, as may
    ``broadcast`` and ``send``. A connection leaves by itself when it ends;
    ``leave`` is for handlers that want out earlier. See the module's
    docstring for the slow-consumer policy and its memory bound.
    """

    def __init__(
        self,
        *,
        max_queued: int = DEFAULT_MAX_QUEUED,
        cutoff_notice: bytes | None = DEFAULT_CUTOFF_NOTICE,
    ) -> None:
        MAX_QUEUED.check("max_queued", max_queued)
        check_type("cutoff_notice", cutoff_notice, (bytes, type(None)), "bytes or None")
        self.max_queued = max_queued
        self.cutoff_notice = cutoff_notice
        #: Members cut off for falling behind, since the group was made.
        self.cut_off_count = 0
        self._changed = threading.Condition()
        self._members: dict[Connection, None] = {}  # Insertion-ordered: join order.
        self._closing: set[Connection] = set()  # Ended, waiting out the stop (see docstring).
        # Members not closing yet, by (their server's stop event, their stop
        # wave): what a member leaving at stop waits on (see _still_reading).
        self._open: dict[tuple[threading.Event, int], int] = {}
        # What broadcasts iterate: rebuilt on every change, read without the lock.
        self._snapshot: tuple[Connection, ...] = ()

    # ------------------------------------------------------------------ membership

    def join(self, conn: Connection) -> None:
        """Add ``conn``; raises ``ConnectionClosed`` if it takes no more writes."""
        conn._join_outbox()
        with self._changed:
            if conn._write_closed is not None:
                raise ConnectionClosed(conn._write_closed)
            if conn in self._members:
                return
            self._members[conn] = None
            self._snapshot = tuple(self._members)
            key = _wave_of(conn)
            self._open[key] = self._open.get(key, 0) + 1
        conn._add_closing_hook(self._member_closing)

    def leave(self, conn: Connection) -> None:
        """Remove ``conn`` (no error if it is not a member). Bytes already queued still go out.

        Not needed when the connection ends: it leaves by itself then, and
        at stop only after the stop's wait (see the module docstring), which
        an explicit ``leave`` in a handler's ``finally`` would skip.
        """
        conn._remove_closing_hook(self._member_closing)
        self._remove(conn)

    def __contains__(self, conn: object) -> bool:
        return conn in self._members

    def __len__(self) -> int:
        return len(self._snapshot)

    def __iter__(self) -> Iterator[Connection]:
        """The members at this moment (a snapshot: joining or leaving meanwhile is fine)."""
        return iter(self._snapshot)

    def __repr__(self) -> str:
        return (
            f"<Group members={len(self._snapshot)} max_queued={self.max_queued}"
            f" cut_off={self.cut_off_count}>"
        )

    # ------------------------------------------------------------------ sending

    def broadcast(
        self, data: bytes | bytearray | memoryview, *, exclude: Connection | None = None
    ) -> int:
        """Hand ``data`` to every member (but ``exclude``) without waiting; return how many took it.

        A member over its queue limit is cut off instead (see the module
        docstring); a member whose connection is closing is skipped.
        ``data`` larger than ``max_queued`` raises ``ValueError``: no member
        could ever queue it.
        """
        payload = bytes(data)  # Ours: a caller's bytearray may change after we return.
        if len(payload) > self.max_queued:
            raise ValueError(
                f"{len(payload)} bytes is more than the group's max_queued ({self.max_queued})"
            )
        reached = 0
        for conn in self._snapshot:
            if conn is not exclude and self._hand_over(conn, payload):
                reached += 1
        return reached

    def send(self, conn: Connection, data: bytes | bytearray | memoryview) -> bool:
        """Hand ``data`` to one member under the group's policy, in order with broadcasts.

        Returns False if ``conn`` is not a member (any more) or was cut off.
        """
        if conn not in self._members:
            return False
        payload = bytes(data)
        if len(payload) > self.max_queued:
            raise ValueError(
                f"{len(payload)} bytes is more than the group's max_queued ({self.max_queued})"
            )
        return self._hand_over(conn, payload)

    def _hand_over(self, conn: Connection, payload: bytes) -> bool:
        try:
            if conn._queue(payload, self.max_queued):
                return True
        except ConnectionClosed:
            self._remove(conn)  # Closing, or cut off by someone else: gone.
            return False
        self._cut(conn)
        return False

    def _cut(self, conn: Connection) -> None:
        reason = f"{conn.peer} fell more than {self.max_queued} bytes behind; cut off"
        logger.warning("%s", reason, extra={"event": "cut_off", "peer": conn.peer})
        with self._changed:
            self.cut_off_count += 1
        self._remove(conn)
        conn._cut_off(self.cutoff_notice, reason)

    # ------------------------------------------------------------------ leaving

    def _remove(self, conn: Connection) -> None:
        with self._changed:
            if conn not in self._members:
                return
            del self._members[conn]
            self._snapshot = tuple(self._members)
            if conn in self._closing:
                self._closing.discard(conn)
            else:
                self._count_closed(conn)

    def _count_closed(self, conn: Connection) -> None:
        """One member fewer still open in its wave; wake waiters when a wave is all done."""
        key = _wave_of(conn)
        left = self._open[key] - 1
        if left:
            self._open[key] = left
        else:
            del self._open[key]
            self._changed.notify_all()

    def _member_closing(self, conn: Connection, deadline: float) -> None:
        """The connection is closing (its closing hook): leave, after the stop's wait."""
        with self._changed:
            if conn not in self._members or conn in self._closing:
                return
            self._closing.add(conn)
            self._count_closed(conn)
            if conn._stop_begun.is_set():
                self._changed.wait_for(
                    lambda: not self._still_reading(conn),
                    max(0.0, deadline - time.monotonic()),
                )
        self._remove(conn)

    def _still_reading(self, leaving: Connection) -> bool:
        """Whether a member woken no later than ``leaving`` by the same stop has not ended yet.

        The server wakes connections in waves, lowest stop group first
        (_broadcast.py); waiting only for members of the same or an earlier
        wave means a wave never waits for one not yet woken.
        """
        stop, wave = _wave_of(leaving)
        return any(event is stop and group <= wave for event, group in self._open)


def _wave_of(conn: Connection) -> tuple[threading.Event, int]:
    """Which stop wakes ``conn`` (its server's), and in which wave."""
    return conn._stop_begun, conn._stop_group
