"""A server behind a (pretend) load balancer: PROXY headers on real loopback sockets.

The test plays the proxy: it connects from loopback and sends the header a
proxy would, built with threadserve's own builder. tests/test_haproxy.py does
the same with a real HAProxy.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
import trustme
from conftest import ServerFactory
from support import NOTICE, SETTLE, recv_exactly, recv_until_eof, wait_until

from threadserve import ConfigurationError, Connection, Server, echo
from threadserve._proxy import (
    Command,
    Family,
    ProxyAddress,
    ProxyInfo,
    Tlv,
    TlvType,
    Transport,
    build_header,
)
from threadserve.testing import RunningServer


def tcp4(source: str, port: int, *, version: int = 2, tlvs: tuple[Tlv, ...] = ()) -> bytes:
    return build_header(
        ProxyInfo(
            version=version,
            command=Command.PROXY,
            family=Family.INET,
            transport=Transport.STREAM,
            source=ProxyAddress(source, port),
            destination=ProxyAddress("198.51.100.1", 443),
            tlvs=tlvs,
        )
    )


def tell_peer(conn: Connection) -> None:
    """Write back who the server thinks the client is, then echo one line."""
    details = conn.proxy
    via = "-" if details is None else details.address.rpartition(":")[0]
    authority = "-" if details is None else (details.header.authority or "-")
    conn.sendall(f"{conn.peer} {via} {authority}\n".encode())
    line = conn.readline(1024)
    conn.sendall(line)


def talk(server: RunningServer, header: bytes, *, source: str = "127.0.0.1") -> bytes:
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(server.tcp_address)
        sock.sendall(header + b"ping\n")
        return recv_until_eof_after_line(sock)


def recv_until_eof_after_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"ping\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("version", [1, 2])
def test_peer_is_the_reported_client(serve: ServerFactory, version: int) -> None:
    server = serve(tell_peer, proxy_protocol=f"v{version}")
    answer = talk(server, tcp4("203.0.113.9", 40000, version=version))
    assert answer == b"203.0.113.9:40000 127.0.0.1 -\nping\n"


@pytest.mark.parametrize("version", [1, 2])
def test_header_bytes_count_as_received(serve: ServerFactory, version: int) -> None:
    server = serve(tell_peer, proxy_protocol=f"v{version}")
    header = tcp4("203.0.113.9", 40000, version=version)
    answer = talk(server, header)
    wait_until(lambda: server.statistics().connections_closed == 1, what="connection closed")
    stats = server.statistics()
    assert stats.bytes_received == len(header) + len(b"ping\n")
    assert stats.bytes_sent >= len(answer)


def test_any_mode_takes_both_versions_and_tlvs(serve: ServerFactory) -> None:
    server = serve(tell_peer, proxy_protocol="any")
    assert talk(server, tcp4("203.0.113.9", 1, version=1)).startswith(b"203.0.113.9:1 ")
    header = tcp4("2.2.2.2", 2, tlvs=(Tlv(TlvType.AUTHORITY, b"api.example"),))
    assert talk(server, header) == b"2.2.2.2:2 127.0.0.1 api.example\nping\n"


def test_local_command_and_unknown_keep_the_connection_address(serve: ServerFactory) -> None:
    server = serve(tell_peer, proxy_protocol="any")
    local = build_header(ProxyInfo(version=2, command=Command.LOCAL))
    assert talk(server, local, source="127.0.0.3").startswith(b"127.0.0.3:")
    assert talk(server, b"PROXY UNKNOWN\r\n", source="127.0.0.4").startswith(b"127.0.0.4:")


def test_header_split_across_segments(serve: ServerFactory) -> None:
    server = serve(tell_peer, proxy_protocol="v2")
    header = tcp4("203.0.113.5", 7)
    with socket.create_connection(server.tcp_address, timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in header[:20]:
            sock.sendall(bytes([byte]))
        sock.sendall(header[20:] + b"pi")
        sock.sendall(b"ng\n")
        assert recv_until_eof_after_line(sock) == b"203.0.113.5:7 127.0.0.1 -\nping\n"


@pytest.mark.parametrize(
    "header",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # No header at all: never guessed.
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12),  # Version 3.
    ],
)
def test_malformed_header_closes_without_running_the_handler(
    serve: ServerFactory, header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    ran = threading.Event()

    def handler(conn: Connection) -> None:
        ran.set()

    server = serve(handler, proxy_protocol="any")
    with socket.create_connection(server.tcp_address, timeout=10) as sock:
        sock.sendall(header)
        # Closed at once, the header unread: a reset, not a reply.
        with pytest.raises(ConnectionResetError):
            recv_until_eof(sock)
    wait_until(lambda: server.statistics().proxy_rejected == 1, what="the rejection counted")
    wait_until(lambda: server.statistics().connections_closed == 1, what="connection closed")
    assert not ran.is_set()
    assert server.statistics().handler_errors == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "PROXY protocol" in warnings[0].getMessage()


def test_rejections_are_logged_once_a_second_not_each(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(echo, proxy_protocol="v1")
    started = time.monotonic()
    for _ in range(5):
        with socket.create_connection(server.tcp_address, timeout=10) as sock:
            sock.sendall(b"HELLO\r\n")
            recv_until_eof_or_reset(sock)
    wait_until(lambda: server.statistics().proxy_rejected == 5, what="five rejections")
    elapsed = time.monotonic() - started
    warnings = [r for r in caplog.records if "PROXY protocol" in r.getMessage()]
    logged = len([r for r in warnings if r.levelno == logging.WARNING])
    # One a second at most, over however long a busy machine took for the
    # five: usually one, and never one per rejection while they come fast.
    assert 1 <= logged <= 1 + int(elapsed), (logged, elapsed)


def recv_until_eof_or_reset(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass


def test_header_timeout(serve: ServerFactory) -> None:
    server = serve(echo, proxy_protocol="v2", proxy_timeout=0.3)
    with socket.create_connection(server.tcp_address, timeout=10) as sock:
        sock.sendall(tcp4("1.1.1.1", 1)[:10])  # Then nothing more.
        recv_until_eof_or_reset(sock)
    assert server.statistics().proxy_rejected == 1


@pytest.mark.parametrize("version", [1, 2])
def test_a_truncated_header_then_eof_is_rejected(serve: ServerFactory, version: int) -> None:
    """The proxy closes in the middle of the header: rejected, counted, no handler."""
    ran = threading.Event()
    server = serve(lambda conn: ran.set(), proxy_protocol="any")
    header = tcp4("203.0.113.9", 40000, version=version)
    with socket.create_connection(server.tcp_address, timeout=10) as sock:
        sock.sendall(header[: len(header) - 3])
        sock.shutdown(socket.SHUT_WR)
        recv_until_eof_or_reset(sock)
    wait_until(lambda: server.statistics().proxy_rejected == 1, what="the rejection counted")
    wait_until(lambda: server.statistics().connections_closed == 1, what="connection closed")
    assert not ran.is_set()


@pytest.mark.parametrize("sent", ["nothing", "half a header"])
def test_a_stop_while_waiting_for_the_header_says_goodbye(serve: ServerFactory, sent: str) -> None:
    """Stopping while a proxy's connection has not finished its header: the goodbye, not silence.

    The proxy relays it to its client, which then knows the server went away
    on purpose (a silent close looks like a refused connection to it).
    """
    ran = threading.Event()
    server = serve(lambda conn: ran.set(), proxy_protocol="v2", grace=5)
    with socket.create_connection(server.tcp_address, timeout=10) as sock:
        if sent == "half a header":
            sock.sendall(tcp4("203.0.113.9", 40000)[:10])
        wait_until(lambda: server.statistics().connections_active == 1, what="the connection")
        report = server.stop()
        assert recv_until_eof(sock) == NOTICE
    assert report is not None
    assert report.clean
    assert not ran.is_set()
    assert server.statistics().proxy_rejected == 0  # A stop, not a bad header.


def test_proxy_outside_the_allow_list_is_closed(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    ran = threading.Event()
    server = serve(lambda conn: ran.set(), proxy_protocol="v2", proxy_allow=["127.0.0.2/32"])
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind(("127.0.0.1", 0))
        sock.connect(server.tcp_address)
        sock.sendall(tcp4("1.1.1.1", 1))
        recv_until_eof_or_reset(sock)
    wait_until(lambda: server.statistics().proxy_rejected == 1, what="the refusal counted")
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(logged) == 1
    assert "not in proxy_allow" in logged[0]
    # From the allowed address it is served.
    answer = talk(server, tcp4("1.1.1.1", 1) + b"", source="127.0.0.2")
    assert answer == b""  # The handler only records that it ran.
    wait_until(ran.is_set, what="the handler ran")
    assert server.statistics().connections_accepted == 1


def test_max_connections_per_ip_counts_the_reported_client(serve: ServerFactory) -> None:
    release = threading.Event()

    def hold(conn: Connection) -> None:
        conn.sendall(b"in\n")
        release.wait(SETTLE)

    server = serve(hold, proxy_protocol="v2", max_connections_per_ip=1)
    socks = []
    try:
        # Two clients behind the one proxy address: both served.
        for client in ("10.0.0.1", "10.0.0.2"):
            sock = socket.create_connection(server.tcp_address, timeout=10)
            socks.append(sock)
            sock.sendall(tcp4(client, 5000))
            assert recv_exactly(sock, 3) == b"in\n"
        # A second connection from 10.0.0.1: over its limit, told busy.
        with socket.create_connection(server.tcp_address, timeout=10) as sock:
            sock.sendall(tcp4("10.0.0.1", 5001))
            assert recv_until_eof(sock) == b"Server busy, try again later\n"
    finally:
        release.set()
        for sock in socks:
            sock.close()
    wait_until(lambda: server.statistics().connections_active == 0, what="all closed")
    # The counts were moved and released: the same client is served again.
    with socket.create_connection(server.tcp_address, timeout=10) as sock:
        sock.sendall(tcp4("10.0.0.1", 5002))
        assert recv_exactly(sock, 3) == b"in\n"


def test_header_comes_before_the_tls_handshake(serve: ServerFactory, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    server = serve(tell_peer, proxy_protocol="v2", tls=context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with socket.create_connection(server.tcp_address, timeout=10) as raw:
        raw.sendall(tcp4("203.0.113.77", 999))
        with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"ping\n")
            data = bytearray()
            while not data.endswith(b"ping\n"):
                chunk = tls.recv(4096)
                assert chunk
                data += chunk
    assert data == b"203.0.113.77:999 127.0.0.1 -\nping\n"


def test_off_by_default_never_guesses(serve: ServerFactory) -> None:
    server = serve(echo)
    header = tcp4("1.1.1.1", 1)
    with socket.create_connection(server.tcp_address, timeout=10) as sock:
        sock.sendall(header)
        assert recv_exactly(sock, len(header)) == header


def test_bad_settings() -> None:
    with pytest.raises(ConfigurationError, match="choose one of"):
        Server(echo, "127.0.0.1:0", proxy_protocol="v3")
    with pytest.raises(ConfigurationError, match="CIDR"):
        Server(echo, "127.0.0.1:0", proxy_protocol="v1", proxy_allow=["10.0.0.0/33"])
    with pytest.raises(ConfigurationError, match="needs proxy_protocol"):
        Server(echo, "127.0.0.1:0", proxy_allow=["10.0.0.0/8"])
    with pytest.raises(ConfigurationError, match="proxy_timeout"):
        Server(echo, "127.0.0.1:0", proxy_protocol="v1", proxy_timeout=0)
    with pytest.raises(ConfigurationError, match="drain_delay"):
        Server(echo, "127.0.0.1:0", drain_delay=-1)


# ---------------------------------------------------------------------- drain before stop


def ask_agent(address: str) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        return recv_until_eof(sock)


def test_drain_delay_keeps_serving_while_the_agent_says_drain() -> None:
    server = Server(
        echo, "127.0.0.1:0", handle_signals=False, agent_bind="127.0.0.1:0", drain_delay=30
    )
    server.start()
    agent = server.agent_address
    assert agent is not None
    assert ask_agent(agent) == b"up ready\n"
    host, _, port = server.addresses[0].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as before:
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        try:
            wait_until(lambda: server.draining, what="the drain to begin")
            assert ask_agent(agent) == b"drain\n"
            # Still serving: the old connection and a new one.
            before.sendall(b"old\n")
            assert recv_exactly(before, 4) == b"old\n"
            with socket.create_connection((host, int(port)), timeout=10) as during:
                during.sendall(b"new\n")
                assert recv_exactly(during, 4) == b"new\n"
            assert server.statistics().connections_accepted == 2
            assert stopper.is_alive()
        finally:
            # A forced stop (or a second signal) cuts the drain short.
            server.stop(grace=0)
            stopper.join(SETTLE)
    assert not stopper.is_alive()
    with pytest.raises(ConnectionRefusedError):
        ask_agent(agent)


def test_drain_delay_ends_in_the_usual_stop() -> None:
    server = Server(
        echo, "127.0.0.1:0", handle_signals=False, agent_bind="127.0.0.1:0", drain_delay=0.2
    )
    server.start()
    host, _, port = server.addresses[0].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        report = server.stop()
        assert report is not None
        assert report.clean
        assert report.drained == 1
        assert recv_until_eof(sock) == b"Shutting down!\n"


def test_defaults_trust_loopback_and_allow_three_seconds() -> None:
    server = Server(echo, "127.0.0.1:0", proxy_protocol="v2")
    plain = Server(echo, "127.0.0.1:0")
    try:
        settings = server._proxy
        assert settings is not None
        assert settings.timeout == 3.0
        assert settings.allows("127.0.0.1")
        assert settings.allows("127.9.9.9")
        assert settings.allows("::1")
        assert not settings.allows("10.0.0.1")
        assert plain._proxy is None  # Off unless asked for.
    finally:
        server.stop()
        plain.stop()


def test_command_line_flags() -> None:
    from threadserve.cli import build_parser, build_server

    args = build_parser().parse_args(
        [
            "serve",
            "echo",
            "--proxy-protocol",
            "v2",
            "--proxy-allow",
            "10.0.0.0/8",
            "--proxy-allow",
            "127.0.0.1",
            "--proxy-timeout",
            "1.5",
            "--agent-bind",
            "127.0.0.1:0",
            "--drain-delay",
            "2",
        ]
    )
    server = build_server(args, ["127.0.0.1:0"], handle_signals=False)
    try:
        settings = server._proxy
        assert settings is not None
        assert settings.mode.value == "v2"
        assert settings.allows("10.1.2.3")
        assert settings.allows("127.0.0.1")
        assert not settings.allows("127.0.0.2")
        assert settings.timeout == 1.5
        assert server.drain_delay == 2.0
        assert server.agent_address is not None
    finally:
        server.stop()


def test_the_connection_thread_is_named_after_the_reported_client(serve: ServerFactory) -> None:
    def tell_thread(conn: Connection) -> None:
        conn.sendall(threading.current_thread().name.encode() + b"\n")
        while line := conn.readline():
            conn.sendall(line)

    server = serve(tell_thread, proxy_protocol="v2")
    answer = talk(server, tcp4("203.0.113.9", 40000, version=2))
    assert answer == b"threadserve 203.0.113.9:40000\nping\n"
