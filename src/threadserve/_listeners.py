"""Listening sockets: parse bind addresses, open them all or none.

Bind addresses are strings a user types on a command line:

* ``HOST:PORT`` - ``127.0.0.1:8000``, ``0.0.0.0:0``, ``localhost:9000``
* ``[IPV6]:PORT`` - ``[::1]:8000``, ``[::]:0``
* ``unix:PATH`` - a Unix domain stream socket
* ``fd://N`` - a listening socket this process inherited as descriptor N
  (from a supervisor, or from systemd: see _systemd.py)

Port 0 asks the kernel for a free port; ``Listener.address`` reports the one
it chose, which is what tests and embedding code connect to.

Ownership decides two things at stop. Only the process that bound a Unix
socket removes its file. And only a listener whose queue nobody else will
serve has its waiting clients told goodbye (``Listener.owns_queue``): a
worker of a supervisor shares one queue with the other workers, so clients
waiting in it are theirs to serve, not this worker's to dismiss.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._exceptions import BindError, ConfigurationError

# The kernel silently caps the backlog at net.core.somaxconn (4096 here), so
# asking for the maximum costs nothing and lets a burst of connects wait in the
# kernel instead of being refused. socketserver's default of 5 refuses bursts.
LISTEN_BACKLOG = 0xFFFF

UNIX_PREFIX = "unix:"
FD_PREFIX = "fd://"


@dataclass(frozen=True)
class BindAddress:
    """A parsed bind address: a TCP host and port, a Unix socket path, or an inherited fd."""

    host: str | None
    port: int | None
    path: str | None = None
    fd: int | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.fd is not None:
            return f"{FD_PREFIX}{self.fd}"
        if self.path is not None:
            return UNIX_PREFIX + self.path
        assert self.host is not None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_bind_address(text: str) -> BindAddress:
    """Parse one bind address, raising ConfigurationError with a fix-it message."""
    usage = "expected HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N"
    text = text.strip()
    if text.startswith(FD_PREFIX):
        number = text[len(FD_PREFIX) :]
        if not (number.isascii() and number.isdigit()) or int(number) < 3:
            raise ConfigurationError(
                f"bad bind address {text!r}: fd://N needs a descriptor number of 3 or more"
            )
        return BindAddress(host=None, port=None, fd=int(number))
    if text.startswith(UNIX_PREFIX):
        path = text[len(UNIX_PREFIX) :]
        if not path:
            raise ConfigurationError(f"bad bind address {text!r}: empty Unix socket path")
        return BindAddress(host=None, port=None, path=path)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigurationError(f"bad bind address {text!r}: {usage}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigurationError(f"bad bind address {text!r}: no port; {usage}")
        if ":" in host:
            raise ConfigurationError(
                f"bad bind address {text!r}: put an IPv6 host in brackets, like [::1]:8000"
            )
    if not host:
        raise ConfigurationError(f"bad bind address {text!r}: no host; {usage}")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ConfigurationError(
            f"bad bind address {text!r}: port must be a number from 0 to 65535"
        )
    return BindAddress(host=host, port=int(port_text))


def format_address(family: int, address: object) -> str:
    """Render a socket address the way users type it: ``1.2.3.4:80``, ``[::1]:80``."""
    if family == socket.AF_INET6 and isinstance(address, tuple):
        return f"[{address[0]}]:{address[1]}"
    if family == socket.AF_INET and isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    if family == getattr(socket, "AF_UNIX", None):
        return UNIX_PREFIX + (address if isinstance(address, str) and address else "(unnamed)")
    return str(address)


class Listener:
    """One bound, listening, non-blocking socket.

    ``owns_queue``: at stop, the clients still waiting in its listen queue
    are this server's to tell (True for what it bound itself); False for a
    queue that other processes go on serving (see the module docstring).
    ``reuse_port``: bound with ``SO_REUSEPORT``, one of a group of listeners
    on the same address, each with a queue of its own.
    """

    def __init__(
        self,
        sock: socket.socket,
        bind_address: BindAddress,
        *,
        owns_queue: bool = True,
        reuse_port: bool = False,
    ) -> None:
        self.socket = sock
        self.bind_address = bind_address
        self.owns_queue = owns_queue
        self.reuse_port = reuse_port
        # Kept as a plain int: ``sock.family`` builds an enum member on every
        # read (about 1 µs), and every accepted client's address is formatted with it.
        self.family = int(sock.family)
        self.address: str = format_address(self.family, sock.getsockname())
        # Remember who created a Unix socket file, so only its owner removes it.
        self._unix_path = bind_address.path
        self._unix_inode = os.stat(bind_address.path).st_ino if bind_address.path else None

    @classmethod
    def inherit(cls, fd: int, *, owns_queue: bool = False, bound_only: bool = False) -> Listener:
        """A listener on descriptor ``fd``, inherited already bound and listening.

        The Listener takes the descriptor (closing it closes ``fd``) but not
        the socket's file: an inherited Unix socket's path is never removed
        here, since this process did not create it. ``bound_only``: a TCP
        socket bound but not listening yet is taken too; ``listen()`` starts it.
        """
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise BindError(f"cannot listen on {FD_PREFIX}{fd}: {_describe(exc)}") from exc
        problem = None
        try:
            if sock.type != socket.SOCK_STREAM:
                problem = "not a stream socket"
            elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) and not (
                bound_only and sock.family in (socket.AF_INET, socket.AF_INET6)
            ):
                problem = "not a listening socket"
            else:
                reuse_port = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
                sock.setblocking(False)
                address = BindAddress(host=None, port=None, fd=fd)
                return cls(sock, address, owns_queue=owns_queue, reuse_port=reuse_port)
        except OSError as exc:
            problem = _describe(exc)
        sock.detach()  # Not ours to close: the caller named the wrong descriptor.
        raise BindError(f"cannot listen on {FD_PREFIX}{fd}: {problem}")

    def fileno(self) -> int:
        return self.socket.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        """Take the next client from the queue; BlockingIOError when there is none.

        What ``socket.accept()`` does, minus its reads of the listener's
        family and type (each builds an enum member) and of the default
        timeout: about 3 µs of a client's 100-150 µs accept-to-thread cost
        here, for facts a listener knows already (every listener is a
        stream socket). The accepted socket is blocking, as there.
        """
        # socket.accept() itself is this pair; _accept is the C accept4() it wraps.
        fd, address = self.socket._accept()  # type: ignore[attr-defined]
        return socket.socket(self.family, socket.SOCK_STREAM, 0, fileno=fd), address

    @property
    def listening(self) -> bool:
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def listen(self) -> None:
        """Start listening, if bound only (see ``open_listeners(listen=False)``)."""
        if not self.listening:
            self.socket.listen(LISTEN_BACKLOG)

    def refuse_new_clients(self) -> bool:
        """Stop taking new connections into the queue; those queued stay acceptable.

        Between the last accept of the stop's queue-emptying loop and
        ``close()``, a new client can still land in the queue, and closing then
        resets it after its connect succeeded: a load balancer counts that as
        a failure of an established connection and cannot retry it. A socket
        filter attached to the listener first makes the kernel drop new SYNs
        (the client retries its connect later and finds the port closed: a
        refusal, which a load balancer retries on another server, or another
        listener of a reuseport group) while connections already queued can
        still be accepted.

        Only a SYN is dropped. A handshake under way when the filter arrives
        (its SYN-ACK sent, the client already counting itself connected)
        must still complete: if its final ACK were dropped, the request would
        wait in the SYN queue until the close threw it away, and the client's
        first segment would then meet a reset. Connections accepted later
        inherit the filter, and their segments all carry ACK (or RST), so it
        passes them. TCP on Linux only (SO_ATTACH_FILTER); False where it is
        not available, and the stop then works as before.
        """
        if self.socket.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, _DROP_SYN_PROGRAM)
        except (OSError, AttributeError):
            return False
        return True

    def hand_over(self) -> None:
        """Another process serves this socket from now on (an upgrade's successor).

        Its queue is no longer this process's to tell at stop, and a Unix
        socket's file stays when this descriptor closes: the successor
        listens on the same socket, so only the descriptor goes.
        """
        self.owns_queue = False
        self._unix_path = None

    def close(self) -> None:
        self.socket.close()
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                if os.stat(self._unix_path).st_ino == self._unix_inode:
                    os.unlink(self._unix_path)

    def __repr__(self) -> str:
        return f"<Listener {self.address}>"


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [
        ("len", ctypes.c_ushort),
        ("filter", ctypes.POINTER(_SockFilter)),
    ]


#: Linux's SO_ATTACH_FILTER (the socket module does not name it).
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
#: A classic BPF program: drop a segment whose flags are SYN without ACK (a
#: new connection's first segment), keep any other whole. A socket filter on a
#: TCP socket sees the packet from the TCP header on, whose byte 13 holds the
#: flags. The kernel copies the program during setsockopt; the array stays
#: alive here.
_DROP_SYN = (_SockFilter * 5)(
    _SockFilter(0x30, 0, 0, 13),  # BPF_LD | BPF_B | BPF_ABS: A = flags byte
    _SockFilter(0x54, 0, 0, 0x12),  # BPF_ALU | BPF_AND | BPF_K: A &= SYN | ACK
    _SockFilter(0x15, 0, 1, 0x02),  # BPF_JMP | BPF_JEQ | BPF_K: SYN alone?
    _SockFilter(0x06, 0, 0, 0),  # BPF_RET | BPF_K: yes, keep no byte (drop)
    _SockFilter(0x06, 0, 0, 0xFFFFFFFF),  # BPF_RET | BPF_K: no, keep it all
)
_DROP_SYN_PROGRAM = bytes(_SockFprog(len(_DROP_SYN), _DROP_SYN))


def open_listeners(
    addresses: Sequence[BindAddress | Listener], *, reuse_port: bool = False, listen: bool = True
) -> list[Listener]:
    """Bind and listen on every address, or on none: a failure closes what was opened.

    A Listener given in ``addresses`` (one made by a supervisor, say) is
    taken as it is. ``fd://N`` addresses are inherited (Listener.inherit).
    With ``reuse_port``, TCP listeners set ``SO_REUSEPORT`` before binding,
    so that several sockets (one per worker process) can listen on one
    address; Unix sockets cannot, and are opened as usual.

    ``listen=False`` binds TCP sockets without listening (``Listener.listen``
    later). A socket joins its SO_REUSEPORT group, and the kernel starts
    handing it clients, only when it listens: a worker that is still
    starting gets none to keep waiting, and one that cannot start none to
    lose, while the bind has already checked the address.
    """
    if not addresses:
        raise ConfigurationError("no bind address given")
    opened: list[Listener] = []
    try:
        for address in addresses:
            if isinstance(address, Listener):
                opened.append(address)
            elif address.fd is not None:
                opened.append(Listener.inherit(address.fd))
            else:
                for sock in _bind(address, reuse_port, listen):
                    opened.append(Listener(sock, address, reuse_port=reuse_port))
    except BaseException:
        for listener in opened:
            listener.close()
        raise
    return opened


def _bind(
    address: BindAddress, reuse_port: bool = False, listen: bool = True
) -> list[socket.socket]:
    if address.path is not None:
        return [_bind_unix(address.path)]
    assert address.host is not None
    assert address.port is not None
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise BindError(f"cannot listen on {address}: unknown host ({exc.strerror})") from exc
    # A name such as "localhost" may resolve to both IPv4 and IPv6. With a
    # fixed port, serve them all; with port 0 each would get a different port,
    # so take the first only and report it.
    seen: list[tuple[int, object]] = []
    for info in infos:
        if (info[0], info[4]) not in seen:
            seen.append((info[0], info[4]))
    if address.port == 0:
        seen = seen[:1]
    socks: list[socket.socket] = []
    try:
        for family, sockaddr in seen:
            socks.append(_bind_inet(address, family, sockaddr, reuse_port, listen))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind_inet(
    address: BindAddress,
    family: int,
    sockaddr: object,
    reuse_port: bool = False,
    listen: bool = True,
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Rebind at once after a restart even while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # Let [::]:P and 0.0.0.0:P be bound side by side, as two listeners.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)  # type: ignore[arg-type]
        if listen:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {address}: {_describe(exc)}") from exc
    return sock


def _bind_unix(path: str) -> socket.socket:
    _remove_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {UNIX_PREFIX}{path}: {_describe(exc)}") from exc
    return sock


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a server that died; refuse to touch a live one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BindError(f"cannot listen on {UNIX_PREFIX}{path}: {_describe(exc)}") from exc
    if not stat.S_ISSOCK(mode):
        raise BindError(f"cannot listen on {UNIX_PREFIX}{path}: file exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        try:
            os.unlink(path)  # Nobody listens: a leftover from an earlier run.
        except OSError as exc:
            raise BindError(
                f"cannot listen on {UNIX_PREFIX}{path}: stale socket file: {_describe(exc)}"
            ) from exc
        return
    except OSError:
        return  # Let bind() report the real problem.
    finally:
        probe.close()
    raise BindError(f"cannot listen on {UNIX_PREFIX}{path}: address already in use")


def _describe(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (is another server running on it?)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this machine"
    return exc.strerror or str(exc)
