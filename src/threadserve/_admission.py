"""Admission: who gets a thread, and what happens to the rest.

Two limits, both counted on live connections: ``max_connections`` in total,
and ``max_connections_per_ip`` per client address, so one noisy address
cannot take every thread from the others. Over the total limit the overload
policy decides:

* ``wait``: stop accepting until a connection ends. New clients wait in the
  kernel's listen queue, which costs the server nothing (gunicorn's gthread
  worker does the same); their connect succeeds, their first reply is late.
* ``reject``: accept, send the one-line busy notice, close. Clients learn at
  once that they should come back later.

Over the per-address limit a client is always rejected: waiting would hold
up everybody else queued behind it.
"""

from __future__ import annotations

import enum
import resource

from ._checks import CONNECTIONS
from ._exceptions import ConfigurationError

#: Descriptors kept back for the server itself (listeners, pipes, logs, imports).
RESERVED_FDS = 64


class OverloadPolicy(str, enum.Enum):
    WAIT = "wait"
    REJECT = "reject"


def default_max_connections() -> int:
    """Three quarters of what the open-file limit leaves after the server's own needs.

    The last quarter is room for handlers that open files or sockets of their
    own (a database connection, a log file) while they serve.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, (soft - RESERVED_FDS) * 3 // 4)


class Admission:
    """Counts live connections; not thread-safe, the server calls it under its lock."""

    def __init__(
        self,
        max_connections: int | None,
        max_connections_per_ip: int | None,
        policy: OverloadPolicy | str,
    ) -> None:
        if max_connections is None:
            max_connections = default_max_connections()
        for name, value in (
            ("max_connections", max_connections),
            ("max_connections_per_ip", max_connections_per_ip),
        ):
            if value is not None:
                CONNECTIONS.check(name, value)
        try:
            self.policy = OverloadPolicy(policy)
        except ValueError:
            choices = ", ".join(p.value for p in OverloadPolicy)
            raise ConfigurationError(
                f"overload policy {policy!r}: choose one of {choices}"
            ) from None
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.active = 0
        self._per_ip: dict[str, int] = {}

    @property
    def full(self) -> bool:
        return self.active >= self.max_connections

    def admit(self, ip: str | None) -> str | None:
        """Count the client in and return None, or return why it is turned away."""
        if self.full:
            return f"over max_connections={self.max_connections}"
        limit = self.max_connections_per_ip
        if ip is not None and limit is not None:
            count = self._per_ip.get(ip, 0)
            if count >= limit:
                return f"over max_connections_per_ip={limit} for {ip}"
            self._per_ip[ip] = count + 1
        self.active += 1
        return None

    def move(self, old_ip: str | None, new_ip: str | None) -> str | None:
        """Count a live connection under ``new_ip`` instead of ``old_ip`` (None: uncounted).

        Behind a proxy the client's address is known only once its PROXY
        header is read, after the connection was admitted. Returns why
        ``new_ip`` is over its limit (then nothing changes), or None.
        """
        if old_ip == new_ip:
            return None
        limit = self.max_connections_per_ip
        if limit is None:
            return None
        if new_ip is not None:
            count = self._per_ip.get(new_ip, 0)
            if count >= limit:
                return f"over max_connections_per_ip={limit} for {new_ip}"
            self._per_ip[new_ip] = count + 1
        if old_ip is not None:
            remaining = self._per_ip[old_ip] - 1
            if remaining:
                self._per_ip[old_ip] = remaining
            else:
                del self._per_ip[old_ip]
        return None

    def release(self, ip: str | None) -> None:
        self.active -= 1
        if ip is not None and self.max_connections_per_ip is not None:
            remaining = self._per_ip[ip] - 1
            if remaining:
                self._per_ip[ip] = remaining
            else:
                del self._per_ip[ip]  # The table only holds addresses with live connections.
