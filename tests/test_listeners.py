"""Listeners: bind address parsing, port 0, IPv6, Unix sockets, all-or-nothing binding, backlog."""

from __future__ import annotations

import os
import select
import socket
import tempfile
import threading
from collections.abc import Iterator

import psutil
import pytest
from conftest import ServerFactory
from support import NOTICE, connect, free_port, recv_exactly, recv_until_eof, wait_until

from threadserve import BindError, ConfigurationError, Server, echo
from threadserve._listeners import BindAddress, open_listeners, parse_bind_address


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A short directory for Unix sockets (their paths are limited to about 100 bytes)."""
    with tempfile.TemporaryDirectory(prefix="ts-", dir="/tmp") as path:
        yield path


def stop_once(server: Server) -> None:
    """Stop unless a stop was already asked for.

    Calling ``stop()`` again after a stop has finished writes to the
    server's closed control pipe, a descriptor number the process may
    already have reused; the tests stay clear of that.
    """
    if not server.stopping:
        server.stop()


def open_fds() -> int:
    return psutil.Process().num_fds()


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def unix_client(path: str) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.settimeout(10)
        client.connect(path)
    except BaseException:
        client.close()
        raise
    return client


def assert_echoes(client: socket.socket, message: bytes) -> None:
    client.sendall(message)
    assert recv_exactly(client, len(message)) == message


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8000", BindAddress("127.0.0.1", 8000)),
        ("0.0.0.0:0", BindAddress("0.0.0.0", 0)),
        ("localhost:65535", BindAddress("localhost", 65535)),
        ("[::1]:8000", BindAddress("::1", 8000)),
        ("[::]:0", BindAddress("::", 0)),
        ("[fe80::1%lo]:9", BindAddress("fe80::1%lo", 9)),
        ("  127.0.0.1:80\n", BindAddress("127.0.0.1", 80)),
        ("unix:/run/app.sock", BindAddress(None, None, "/run/app.sock")),
        ("unix:relative/app.sock", BindAddress(None, None, "relative/app.sock")),
    ],
)
def test_parse_bind_address_accepts_the_documented_forms(text: str, expected: BindAddress) -> None:
    parsed = parse_bind_address(text)
    assert parsed == expected
    assert parsed.is_unix == (expected.path is not None)
    # It prints the way a user would type it, and that parses back to the same thing.
    assert parse_bind_address(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("8000", "no port"),
        ("127.0.0.1", "no port"),
        ("", "no port"),
        (":8000", "no host"),
        ("[]:8000", "no host"),
        ("::1:8000", r"put an IPv6 host in brackets, like \[::1\]:8000"),
        ("[::1]", "expected HOST:PORT"),
        ("[::1]8000", "expected HOST:PORT"),
        ("[::1:8000", "expected HOST:PORT"),
        ("127.0.0.1:", "port must be a number from 0 to 65535"),
        ("127.0.0.1:http", "port must be a number from 0 to 65535"),
        ("127.0.0.1:-1", "port must be a number from 0 to 65535"),
        ("127.0.0.1:65536", "port must be a number from 0 to 65535"),
        ("127.0.0.1:80.0", "port must be a number from 0 to 65535"),
        ("[::1]:99999", "port must be a number from 0 to 65535"),
        ("unix:", "empty Unix socket path"),
    ],
)
def test_parse_bind_address_rejects_bad_forms_with_a_clear_message(text: str, reason: str) -> None:
    with pytest.raises(ConfigurationError, match=reason) as info:
        parse_bind_address(text)
    assert isinstance(info.value, ValueError)
    # The message quotes what the user typed, so they can find it in their config.
    assert repr(text.strip()) in str(info.value)


def test_server_with_a_bad_bind_address_raises_before_opening_anything() -> None:
    fds_before = open_fds()
    with pytest.raises(ConfigurationError, match="no port"):
        Server(echo, ["127.0.0.1:0", "localhost"], handle_signals=False)
    assert open_fds() == fds_before


# ---------------------------------------------------------------- TCP


def test_port_zero_reports_the_port_the_kernel_chose(serve: ServerFactory) -> None:
    server = serve(echo, bind="127.0.0.1:0")
    (address,) = server.addresses
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1"
    assert int(port) > 0
    assert server.tcp_address == ("127.0.0.1", int(port))
    with connect(server.tcp_address) as client:
        assert client.getpeername() == ("127.0.0.1", int(port))
        assert_echoes(client, b"port zero")


def test_ipv6_loopback_with_port_zero(serve: ServerFactory) -> None:
    server = serve(echo, bind="[::1]:0")
    (address,) = server.addresses
    assert address.startswith("[::1]:")
    assert port_of(address) > 0
    assert server.tcp_address == ("::1", port_of(address))
    with socket.create_connection(server.tcp_address, timeout=10) as client:
        assert client.family == socket.AF_INET6
        assert_echoes(client, b"over IPv6")


def test_several_addresses_are_served_at_once(serve: ServerFactory, socket_dir: str) -> None:
    path = os.path.join(socket_dir, "s")
    server = serve(echo, bind=["127.0.0.1:0", "[::1]:0", f"unix:{path}"])
    assert len(server.addresses) == 3
    ipv4, ipv6, unix = server.addresses
    assert ipv4.startswith("127.0.0.1:")
    assert ipv6.startswith("[::1]:")
    assert unix == f"unix:{path}"
    with (
        socket.create_connection(("127.0.0.1", port_of(ipv4)), timeout=10) as first,
        socket.create_connection(("::1", port_of(ipv6)), timeout=10) as second,
        unix_client(path) as third,
    ):
        for index, client in enumerate((first, second, third)):
            assert_echoes(client, b"client %d" % index)
        wait_until(lambda: server.statistics().connections_active == 3)
        peers = sorted(conn.peer for conn in server.connections())
    assert peers[0].startswith("127.0.0.1:")
    assert peers[1].startswith("[::1]:")
    assert peers[2].startswith("unix:")


def listening_ports() -> set[int]:
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


def test_binding_is_all_or_nothing_when_a_later_address_is_in_use() -> None:
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        taken = occupant.getsockname()[1]
        first = free_port()
        fds_before = open_fds()
        with pytest.raises(BindError, match="address already in use") as info:
            Server(echo, [f"127.0.0.1:{first}", f"127.0.0.1:{taken}"], handle_signals=False)
        assert isinstance(info.value, OSError)
        assert f"127.0.0.1:{taken}" in str(info.value)
        # The first listener, which did bind, was closed again.
        assert open_fds() == fds_before
        assert first not in listening_ports()
        with socket.socket() as again:
            again.bind(("127.0.0.1", first))


def test_binding_is_all_or_nothing_when_a_later_address_is_not_local() -> None:
    fds_before = open_fds()
    # 192.0.2.0/24 is reserved for documentation: never an address of this machine.
    with pytest.raises(BindError, match="not available"):
        Server(echo, ["127.0.0.1:0", "[::1]:0", "192.0.2.1:0"], handle_signals=False)
    assert open_fds() == fds_before


def test_the_listen_backlog_holds_a_burst_of_a_thousand_connects() -> None:
    burst = 1000
    server = Server(echo, "127.0.0.1:0", handle_signals=False)
    address = ("127.0.0.1", port_of(server.addresses[0]))
    clients: list[socket.socket] = []
    try:
        # Nobody accepts yet: every connect must complete in the kernel's queue.
        # With a small backlog the kernel drops the excess SYNs and these time out.
        for _ in range(burst):
            clients.append(socket.create_connection(address, timeout=5))
        assert server.statistics().connections_accepted == 0
        server.start()
        wait_until(lambda: server.statistics().connections_accepted == burst, timeout=30)
        assert_echoes(clients[-1], b"last in the queue")
        for client in clients:
            client.close()
        wait_until(lambda: server.statistics().connections_closed == burst, timeout=30)
    finally:
        for client in clients:
            client.close()
        stop_once(server)


@pytest.mark.parametrize("bind", ["127.0.0.1:0", "[::1]:0", "unix"])
def test_listener_accept_gives_what_socket_accept_gives(bind: str, socket_dir: str) -> None:
    spec = f"unix:{os.path.join(socket_dir, 'accept.sock')}" if bind == "unix" else bind
    (listener,) = open_listeners([parse_bind_address(spec)])
    try:
        with pytest.raises(BlockingIOError):
            listener.accept()  # Nobody waiting: the listener is non-blocking.
        client = socket.socket(listener.family, socket.SOCK_STREAM)
        client.settimeout(10)
        with client:
            client.connect(listener.socket.getsockname())
            wait_until(lambda: listener.socket in select.select([listener.socket], [], [], 0)[0])
            sock, address = listener.accept()
            with sock:
                assert (sock.family, sock.type) == (listener.socket.family, socket.SOCK_STREAM)
                assert sock.getblocking(), "socket.accept() gives a blocking socket too"
                assert address == sock.getpeername()
                if bind != "unix":
                    assert address == client.getsockname()
                sock.sendall(b"both ways")
                assert recv_exactly(client, 9) == b"both ways"
    finally:
        listener.close()


# ---------------------------------------------------------------- Unix sockets


def test_unix_socket_is_served_and_its_file_removed_at_stop(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "app.sock")
    server = Server(echo, f"unix:{path}", handle_signals=False).start()
    try:
        assert server.addresses == [f"unix:{path}"]
        assert os.path.exists(path)
        with unix_client(path) as client:
            assert_echoes(client, b"over a Unix socket")
            wait_until(lambda: server.statistics().connections_active == 1)
            assert server.connections()[0].peer == "unix:(unnamed)"
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            assert recv_until_eof(client) == NOTICE
        stopper.join(10)
        assert not os.path.exists(path)
    finally:
        stop_once(server)


def test_a_stale_unix_socket_file_is_replaced(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "stale.sock")
    # What a server that died leaves behind: the file, with nobody listening.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)
    assert os.path.exists(path)
    with Server(echo, f"unix:{path}", handle_signals=False) as server:
        server.start()
        with unix_client(path) as client:
            assert_echoes(client, b"fresh")
    assert not os.path.exists(path)


def test_a_live_unix_socket_is_refused_and_left_alone(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "live.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(path)
        live.listen()
        fds_before = open_fds()
        with pytest.raises(BindError, match="address already in use"):
            Server(echo, f"unix:{path}", handle_signals=False)
        assert open_fds() == fds_before
        # The other server's socket still works.
        with unix_client(path):
            accepted, _ = live.accept()
            accepted.close()
    assert os.path.exists(path)


def test_a_unix_path_that_is_not_a_socket_is_refused_and_kept(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "precious.txt")
    with open(path, "w") as file:
        file.write("not a socket")
    with pytest.raises(BindError, match="not a socket"):
        Server(echo, f"unix:{path}", handle_signals=False)
    with open(path) as file:
        assert file.read() == "not a socket"


def test_stopping_does_not_remove_a_socket_file_another_server_now_owns(
    socket_dir: str,
) -> None:
    path = os.path.join(socket_dir, "shared.sock")
    server = Server(echo, f"unix:{path}", handle_signals=False)
    try:
        # Someone replaced our socket file with theirs while we were running.
        os.unlink(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            other.bind(path)
            server.stop()
            assert os.path.exists(path)
    finally:
        stop_once(server)


def test_refusing_new_clients_keeps_the_queued_ones_acceptable() -> None:
    """The stop's first step: nobody new enters the queue, those in it can still be told."""
    (listener,) = open_listeners([parse_bind_address("127.0.0.1:0")])
    try:
        port = listener.socket.getsockname()[1]
        queued = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert listener.refuse_new_clients()
        late = socket.socket()
        late.settimeout(0.5)
        # Its SYN is dropped: no answer (not even a refusal) while the listener lives.
        with pytest.raises(TimeoutError):
            late.connect(("127.0.0.1", port))
        late.close()
        listener.socket.settimeout(10)
        accepted, _ = listener.socket.accept()
        with accepted:
            accepted.sendall(b"told")
            assert queued.recv(4) == b"told"
        queued.close()
    finally:
        listener.close()


def test_a_handshake_under_way_when_refusing_begins_still_completes() -> None:
    """Only new SYNs are dropped: a client already past its SYN-ACK gets in.

    TCP_DEFER_ACCEPT holds a finished handshake in the listener's SYN queue
    until the client's first data arrives, which is the moment of a real
    race (the final ACK still on its way when the filter is attached) made
    to last. Were every segment dropped, that data would never complete the
    handshake, and the close would reset a client that counts itself
    connected.
    """
    (listener,) = open_listeners([parse_bind_address("127.0.0.1:0")])
    try:
        listener.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)
        port = listener.socket.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert listener.refuse_new_clients()
            client.sendall(b"first")
            listener.socket.settimeout(10)
            accepted, _ = listener.socket.accept()
            with accepted:
                accepted.settimeout(10)
                assert accepted.recv(5) == b"first"
                # The accepted socket inherits the filter; what it passes:
                accepted.sendall(b"reply")
                assert client.recv(5) == b"reply"
                client.shutdown(socket.SHUT_WR)
                assert accepted.recv(1) == b""
    finally:
        listener.close()


def test_refusing_new_clients_is_a_no_op_for_unix_sockets(socket_dir: str) -> None:
    (listener,) = open_listeners([parse_bind_address(f"unix:{socket_dir}/s.sock")])
    try:
        assert not listener.refuse_new_clients()
    finally:
        listener.close()
