"""Per-connection setup: the ordered steps between accept and the handler.

They run in the connection's own thread, never on the accept loop, so a
client (or a proxy) that is slow to speak costs one thread for at most its
timeout, not the whole server. The order is fixed by the wire:

1. The PROXY protocol header (when ``proxy_protocol`` is on). It comes first,
   before any TLS byte, so it is read from the bare socket. It may replace
   the connection's peer with the client the proxy reports, and the
   per-address admission count is moved to that client.
2. The TLS handshake (when ``tls`` is set).

Reading the header: the parser (_proxy.py) says either "need more", in which
case every byte it saw belongs to the header, or "complete after N bytes".
So the header is read with ``MSG_PEEK`` and then exactly the header's bytes
are taken from the socket: the first byte after it is still in the kernel's
queue for the next reader. That matters for TLS, whose layer reads the socket
itself and could not be handed bytes read too far (``Connection.unread`` only
feeds the handler's reads); with plain TCP it saves an unread.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._checks import TIMEOUT
from ._connection import Connection
from ._exceptions import ConfigurationError, ProxyProtocolError, ReadTimeout, ThreadserveError
from ._listeners import format_address
from ._proxy import Family, ProxyDetails, ProxyInfo, ProxyMode, parse_header

logger = logging.getLogger("threadserve")

DEFAULT_PROXY_TIMEOUT = 3.0
#: By default only proxies on this machine may send a header.
DEFAULT_PROXY_ALLOW = ("127.0.0.0/8", "::1/128")
#: How much to peek at once: a whole v1 line, or a v2 header with a few TLVs,
#: arrives in one read (the spec keeps headers within one 536-byte segment).
PEEK_SIZE = 536

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(ThreadserveError):
    """The client the proxy reports is over a limit (``max_connections_per_ip``)."""


class Aborted(ThreadserveError):
    """The connection ended during setup: the peer left, or (``stopping``) the server stops."""

    def __init__(self, message: str, *, stopping: bool = False) -> None:
        super().__init__(message)
        self.stopping = stopping


@dataclass(frozen=True)
class ProxySettings:
    """How a server reads PROXY headers: versions, trusted proxies, time allowed."""

    mode: ProxyMode
    allow: tuple[_Network, ...]
    timeout: float

    @classmethod
    def from_options(
        cls, mode: ProxyMode | str | None, allow: Sequence[str] | None, timeout: float
    ) -> ProxySettings | None:
        """Validated settings, or None when the protocol is off (then no header is guessed)."""
        if mode is None:
            if allow is not None:
                raise ConfigurationError("proxy_allow needs proxy_protocol")
            return None
        try:
            mode = ProxyMode(mode)
        except ValueError:
            choices = ", ".join(m.value for m in ProxyMode)
            raise ConfigurationError(f"proxy_protocol={mode!r}: choose one of {choices}") from None
        TIMEOUT.check("proxy_timeout", timeout)
        if isinstance(allow, str):  # One string would be read as a list of its characters.
            raise ConfigurationError(
                f"proxy_allow={allow!r}: expected a list of addresses or networks, "
                f"such as [{allow!r}]"
            )
        networks = []
        for text in DEFAULT_PROXY_ALLOW if allow is None else allow:
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ConfigurationError(
                    f"proxy_allow {text!r}: expected an address or CIDR, such as 10.0.0.0/8"
                ) from None
        return cls(mode, tuple(networks), float(timeout))

    def allows(self, ip: str | None) -> bool:
        """Whether a connection from ``ip`` may send a header (None: a Unix socket, local)."""
        if ip is None:
            return True
        address = ipaddress.ip_address(ip.partition("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow)


@dataclass(frozen=True)
class SetupSteps:
    """What a server runs on each new connection before its handler.

    ``readmit(conn, ip)`` moves the connection's per-address admission count
    to ``ip`` and returns None, or returns why that address is over its limit.
    """

    proxy: ProxySettings | None
    tls: object | None  # An ssl.SSLContext; typed loosely to keep ssl out of this import.
    readmit: Callable[[Connection, str | None], str | None]


def set_up(conn: Connection, steps: SetupSteps) -> None:
    """Run the setup steps in order; raise to end the connection before its handler runs."""
    if steps.proxy is not None:
        info = read_proxy_header(conn, steps.proxy)
        adopt_proxy_info(conn, info, steps.readmit)
    if steps.tls is not None:
        conn._tls_handshake(steps.tls)  # type: ignore[arg-type]


def read_proxy_header(conn: Connection, settings: ProxySettings) -> ProxyInfo:
    """Read exactly one PROXY header from the connection's socket, within the timeout.

    Raises ``ProxyProtocolError`` for a malformed, truncated or late header,
    and ``Aborted`` when the peer leaves before sending anything or the server
    begins to stop.
    """
    sock = conn._sock
    deadline = conn._clock() + settings.timeout
    header = bytearray()
    while True:
        try:
            ready = conn._wait_readable(deadline)
        except ReadTimeout:
            raise ProxyProtocolError(
                f"no complete PROXY header within {settings.timeout:g} s"
                f" ({len(header)} bytes arrived)"
            ) from None
        if not ready:
            raise Aborted("server stopping before the PROXY header arrived", stopping=True)
        # Stopping, but the header (or part of it) had arrived: it is still
        # read, and the connection is then wound down like any other.
        try:
            peeked = sock.recv(PEEK_SIZE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            if conn._stop_budget is not None:
                raise Aborted(
                    "server stopping before the PROXY header was complete", stopping=True
                ) from None
            continue  # Readiness the socket then disagreed with; wait again.
        except OSError as exc:
            raise Aborted(exc.strerror or str(exc)) from None
        if not peeked:
            if header:
                raise ProxyProtocolError(
                    f"connection closed after {len(header)} bytes of a PROXY header"
                )
            raise Aborted("closed before sending a PROXY header")
        result = parse_header(header + peeked, settings.mode)
        wanted = len(peeked) if result is None else result[1] - len(header)
        try:
            taken = sock.recv(wanted)
        except OSError as exc:
            raise Aborted(exc.strerror or str(exc)) from None
        header += taken
        # The header came off this connection's socket: its bytes count as
        # received, as a packet capture or the proxy's own counters see them.
        conn.bytes_received += len(taken)
        if result is not None and len(taken) == wanted:
            return result[0]


def adopt_proxy_info(
    conn: Connection, info: ProxyInfo, readmit: Callable[[Connection, str | None], str | None]
) -> None:
    """Make the reported client the connection's peer; keep the proxy's address in ``proxy``."""
    proxy_peer = conn.peer
    client_ip = _socket_ip(conn._sock)
    if not info.local and info.source is not None:
        source = info.source
        if info.family is Family.UNIX:
            conn.peer = format_address(socket.AF_UNIX, source.host)
            client_ip = None
        else:
            family = socket.AF_INET if info.family is Family.INET else socket.AF_INET6
            conn.peer = format_address(family, (source.host, source.port))
            client_ip = source.host
    conn.proxy = ProxyDetails(proxy_peer, info)
    refusal = readmit(conn, client_ip)
    if refusal is not None:
        raise Refused(refusal)
    logger.info(
        "connection opened: %s (via %s)",
        conn.peer,
        proxy_peer,
        extra={"event": "connection_opened", "peer": conn.peer, "proxy": proxy_peer},
    )


def _socket_ip(sock: socket.socket) -> str | None:
    """The IP address at the other end of the socket itself (None for a Unix socket)."""
    try:
        address = sock.getpeername()
    except OSError:
        return None
    return address[0] if isinstance(address, tuple) else None
