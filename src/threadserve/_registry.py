"""The registry: a server's live connections and its counts, as one piece of state.

What it holds:

- the live connections, each with the thread serving it (None until a thread
  picks the connection up);
- the live count per stop group, which the stop's waves read (_broadcast.py);
- the threads that left the registry but may not have returned yet, which
  the stop joins;
- the totals: clients accepted and refused, connections closed with their
  bytes, handler errors, PROXY rejections, and the per-reason counters and
  histograms (_events.py).

Every method runs with the server's lock held. The lock is not the
registry's own: the accept side (_accept.py) and the stop (_stop.py) take it
too, to change the registry together with their own state (a paused accept,
a stop wave) in one step. Holding it across several fields is what lets
``statistics()`` read a connection either live or closed, never both or
neither, and its bytes counted once.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

from ._broadcast import MAX_GROUPS
from ._events import CloseReason, Counters, RejectReason, StopOutcome

if TYPE_CHECKING:
    from ._admission import Admission
    from ._connection import Connection


class Registry:
    """A server's live connections and counts; see the module docstring.

    Resource handling: it owns no socket or thread; ``remove`` frees the
    connection's admission slot.
    """

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        #: Live connections and the thread serving each (None until one picks it up).
        self.live: dict[Connection, threading.Thread | None] = {}
        #: Live connections per stop group.
        self.group_live = [0] * MAX_GROUPS
        #: Threads that left ``live`` but may not have returned yet.
        self.finishing: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self.accepted = 0
        self.rejected = 0
        self.closed = 0
        self.handler_errors = 0
        self.proxy_rejected = 0
        # Bytes of closed connections; a live one's are read off the connection.
        self._closed_bytes_in = 0
        self._closed_bytes_out = 0
        self.counters = Counters()

    # ------------------------------------------------------------------ in and out

    def count_in(self, ip: str | None) -> tuple[str, RejectReason] | None:
        """Admission's verdict on a new client, counted: None, or the refusal and why."""
        refusal = self.admission.admit(ip)
        if refusal is None:
            self.accepted += 1
            return None
        # Admission checks the total before the per-address limit.
        full = self.admission.full
        why = RejectReason.MAX_CONNECTIONS if full else RejectReason.MAX_CONNECTIONS_PER_IP
        self.count_refused(why)
        return refusal, why

    def readmit(self, conn: Connection, ip: str | None) -> str | None:
        """Count ``conn`` under ``ip`` (the client a proxy reported), or say why not."""
        refusal = self.admission.move(conn._client_ip, ip)
        if refusal is None:
            conn._client_ip = ip
        else:
            self.count_refused(RejectReason.MAX_CONNECTIONS_PER_IP)
        return refusal

    def add(self, conn: Connection) -> None:
        """A connection admitted (``count_in``) and made: live, with no thread yet."""
        self.live[conn] = None
        self.group_live[conn._stop_group] += 1

    def serve(self, conn: Connection, thread: threading.Thread) -> None:
        """``thread`` has picked ``conn`` up."""
        self.live[conn] = thread

    def remove(
        self,
        conn: Connection,
        reason: CloseReason,
        duration: float,
        finishing: threading.Thread | None,
    ) -> int:
        """``conn`` has closed: fold it into the totals; return how many are still live.

        ``finishing`` is the thread that served it (None when no thread did:
        its start failed). It may park for the next client or end; either
        way the stop joins it, so that no thread outlives the stop.
        """
        if finishing is not None:
            self.finishing.add(finishing)
        del self.live[conn]
        self.group_live[conn._stop_group] -= 1
        self.admission.release(conn._client_ip)
        self.closed += 1
        self._closed_bytes_in += conn.bytes_received
        self._closed_bytes_out += conn.bytes_sent
        self.counters.closed[reason] += 1
        self.counters.connection_durations.observe(duration)
        return len(self.live)

    # ------------------------------------------------------------------ other counts

    def count_refused(self, why: RejectReason, count: int = 1) -> None:
        """Clients turned away (or, at stop, told and closed) for ``why``."""
        self.rejected += count
        self.counters.rejected[why] += count

    def count_handler_error(self) -> None:
        """A handler raised something other than a connection's own ending."""
        self.handler_errors += 1

    def count_proxy_rejected(self) -> None:
        """A client closed for a missing, malformed or unauthorised PROXY header."""
        self.proxy_rejected += 1

    def count_stop(self, outcome: StopOutcome, duration: float) -> None:
        self.counters.stops[outcome] += 1
        self.counters.stop_durations.observe(duration)

    # ------------------------------------------------------------------ reading

    def bytes_moved(self) -> tuple[int, int]:
        """Bytes received and sent, by closed connections and live ones so far."""
        received = self._closed_bytes_in + sum(conn.bytes_received for conn in self.live)
        sent = self._closed_bytes_out + sum(conn.bytes_sent for conn in self.live)
        return received, sent

    def threads_remain(self) -> bool:
        """Whether a connection is still live or a thread that served one still runs."""
        return bool(self.live) or any(thread.is_alive() for thread in self.finishing)
