"""TLS under attack, the stop contract over TLS, and client certificates.

Certificates come from trustme, made fresh for each test session in a
temporary directory: no key is ever written into the repository.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from conftest import ServerFactory
from cryptography.hazmat.primitives import serialization
from hostile import ATTACKER_ADDRESS, connect_from, ms, percentile, report
from support import NOTICE, ServerProcess, recv_exactly, server_process, wait_until

from threadserve import ConfigurationError, Connection, StopReport, echo, server_tls_context

HOSTNAME = "localhost"


@dataclass(frozen=True)
class Certificates:
    ca: trustme.CA
    server_pem: Path  # Key and chain in one file.
    ca_pem: Path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server_pem = directory / "server.pem"
    ca.issue_cert(HOSTNAME, "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(server_pem)
    )
    ca_pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    return Certificates(ca, server_pem, ca_pem)


def client_context(certificates: Certificates) -> ssl.SSLContext:
    context = ssl.create_default_context()
    certificates.ca.configure_trust(context)
    return context


def tls_connect(
    context: ssl.SSLContext, address: tuple[str, int], timeout: float = 10.0
) -> ssl.SSLSocket:
    """Connect and complete the handshake; EOF without close_notify raises SSLEOFError."""
    sock = socket.create_connection(address, timeout=timeout)
    try:
        # suppress_ragged_eofs=False: a plain FIN where close_notify belongs
        # raises instead of passing for a clean end of stream.
        return context.wrap_socket(sock, server_hostname=HOSTNAME, suppress_ragged_eofs=False)
    except BaseException:
        sock.close()
        raise


def half_a_client_hello(context: ssl.SSLContext) -> bytes:
    """The first half of the bytes a real client handshake starts with."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "not a TLS handshake record"
    return hello[: len(hello) // 2]


# ---------------------------------------------------------------- stalled handshakes


def test_stalled_handshakes_do_not_delay_real_clients(certificates: Certificates) -> None:
    # The server runs in its own process, as in production: in this one, the
    # 50 client handshakes below would share the GIL with the server's and
    # be measured as the server's latency. The timeout leaves the real
    # clients seconds to be served while every attacker still holds a thread,
    # even on a machine whose cores are busy with other work.
    handshake_timeout = 4.0
    with server_process(
        "echo",
        "--bind",
        "127.0.0.1:0",
        "--tls-cert",
        str(certificates.server_pem),
        "--handshake-timeout",
        str(handshake_timeout),
    ) as (server, address):
        _attack_with_stalled_handshakes(server, address, certificates, handshake_timeout)


def _attack_with_stalled_handshakes(
    server: ServerProcess,
    address: tuple[str, int],
    certificates: Certificates,
    handshake_timeout: float,
) -> None:
    context = client_context(certificates)
    partial_hello = half_a_client_hello(context)
    silent, stalled = 200, 50

    attackers: list[socket.socket] = []
    connected_at: list[float] = []
    closed_at: dict[int, float] = {}
    outcome: dict[int, str] = {}
    handshakes: list[float] = []
    served_at: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def real_client(index: int) -> None:
        line = f"real client {index}\n".encode()
        try:
            started = time.monotonic()
            with tls_connect(context, address) as sock:
                elapsed = time.monotonic() - started
                sock.sendall(line)
                assert recv_exactly(sock, len(line)) == line
            with lock:
                handshakes.append(elapsed)
                served_at.append(time.monotonic())
        except (OSError, EOFError, AssertionError) as exc:
            with lock:
                errors.append(f"client {index}: {exc!r}")

    selector = selectors.DefaultSelector()
    real_clients = [
        threading.Thread(target=real_client, args=(i,), name=f"tls client {i}") for i in range(50)
    ]
    try:
        for index in range(silent + stalled):
            sock = connect_from(ATTACKER_ADDRESS, address)
            connected_at.append(time.monotonic())
            attackers.append(sock)
            if index >= silent:
                sock.sendall(partial_hello)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        wait_until(
            lambda: server.output().count("connection opened") == silent + stalled,
            what="every attacker holding a handshake thread",
        )
        clients_from = time.monotonic()
        for thread in real_clients:
            thread.start()
        # Meanwhile, note when the server lets go of each attacker.
        deadline = time.monotonic() + handshake_timeout + 5
        while selector.get_map():
            assert time.monotonic() < deadline, f"{len(selector.get_map())} attackers still open"
            for key, _events in selector.select(0.5):
                index = key.data
                try:
                    data = attackers[index].recv(4096)
                    outcome[index] = "EOF" if not data else f"data {data[:20]!r}"
                except BlockingIOError:
                    continue
                except OSError as exc:
                    outcome[index] = type(exc).__name__
                closed_at[index] = time.monotonic()
                selector.unregister(attackers[index])
    finally:
        for thread in real_clients:
            if thread.ident is not None:
                thread.join(20)
        selector.close()
        for sock in attackers:
            sock.close()

    held = [closed_at[i] - connected_at[i] for i in range(silent + stalled)]
    first_let_go = min(closed_at.values())
    served_before = sum(clients_from <= t < first_let_go for t in served_at)
    seen = {what: list(outcome.values()).count(what) for what in set(outcome.values())}
    report(
        "tls stalled handshakes",
        silent=silent,
        stalled=stalled,
        attackers_closed_after=f"{min(held):.3f}-{max(held):.3f} s",
        attackers_saw=seen,
        real_clients=f"{len(handshakes)}/50",
        served_while_attackers_held=f"{served_before}/50",
        handshake_p50=ms(percentile(handshakes, 0.5)) if handshakes else "-",
        handshake_p99=ms(percentile(handshakes, 0.99)) if handshakes else "-",
    )
    assert not errors, errors[:5]
    assert len(handshakes) == 50
    # Every real client shook hands and got its echo while all 250 attackers
    # still held their handshakes: none waited for an attacker's timeout (a
    # handshake on the accept loop, or a pool the attackers fill, would make
    # them). How many milliseconds a handshake takes is a figure for bench/.
    assert served_before == 50, "real clients waited for the stalled handshakes to time out"
    assert max(handshakes) < handshake_timeout / 2
    # Never before the timeout; after it, by what a busy machine adds to the
    # server waking 250 threads at once and to this test's polling.
    assert all(handshake_timeout - 0.25 <= t <= handshake_timeout + 1.5 for t in held)
    assert set(outcome.values()) == {"EOF"}
    wait_until(
        lambda: server.output().count("connection closed") == silent + stalled + 50,
        what="the server to log every connection closed",
    )
    assert "handler failed" not in server.output()


# ---------------------------------------------------------------- stop contract over TLS


def test_stop_over_tls_echoes_then_notice_then_close_notify(
    serve: ServerFactory, certificates: Certificates
) -> None:
    server = serve(echo, tls=server_tls_context(str(certificates.server_pem)))
    context = client_context(certificates)
    clients = [tls_connect(context, server.tcp_address) for _ in range(20)]
    try:
        expected_in = 0
        for index, client in enumerate(clients):
            for frame in range(3):
                line = f"{index}:{frame}\n".encode()
                client.sendall(line)
                assert recv_exactly(client, len(line)) == line
                expected_in += len(line)
        wait_until(lambda: server.statistics().bytes_sent == expected_in, what="echoes counted")

        reports: list[object] = []
        stopping = threading.Thread(target=lambda: reports.append(server.stop()), name="stop")
        started = time.monotonic()
        stopping.start()
        ends = []
        for client in clients:
            received = bytearray()
            # recv returns b"" only on close_notify; a bare FIN or a reset raises.
            while chunk := client.recv(4096):
                received += chunk
            ends.append(bytes(received))
            client.close()
        stopping.join(20)
        elapsed = time.monotonic() - started
    finally:
        for client in clients:
            client.close()
    stop_report = reports[0] if reports else None
    report("tls stop", clients=len(clients), stopped_in=ms(elapsed), report=stop_report)
    assert ends == [NOTICE] * len(clients)
    assert isinstance(stop_report, StopReport)
    assert stop_report.clean


# ---------------------------------------------------------------- client certificates


def knock(context: ssl.SSLContext, address: tuple[str, int], line: bytes) -> bytes:
    """Connect, say one line, return the echo."""
    with tls_connect(context, address) as sock:
        sock.sendall(line)
        return recv_exactly(sock, len(line))


def test_client_certificate_required_when_a_client_ca_is_set(
    serve: ServerFactory, certificates: Certificates, caplog: pytest.LogCaptureFixture
) -> None:
    handled: list[str] = []

    def recording_echo(conn: Connection) -> None:
        handled.append(conn.peer)  # The handler runs only after a good handshake.
        echo(conn)

    server = serve(
        recording_echo,
        tls=server_tls_context(str(certificates.server_pem), client_ca=str(certificates.ca_pem)),
    )
    address = server.tcp_address

    # With TLS 1.3 the client's side of the handshake completes before the
    # server has checked the (missing) certificate, so the refusal reaches the
    # client as an alert on its first read or, when the server has already
    # closed on it, as an error on its first write (SSLEOFError, seen about
    # one run in three).
    anonymous = client_context(certificates)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)) as refused:
        knock(anonymous, address, b"let me in\n")

    identified = client_context(certificates)
    certificates.ca.issue_cert("client.example.org").configure_cert(identified)
    assert knock(identified, address, b"it is me\n") == b"it is me\n"

    wait_until(lambda: server.statistics().connections_closed == 2, what="both closed")
    stats = server.statistics()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    outcomes = [r.getMessage() for r in caplog.records if "TLS error" in r.getMessage()]
    report(
        "tls client certificates",
        without_cert=f"{type(refused.value).__name__}: {refused.value}",
        server_saw=outcomes,
        with_cert="served",
    )
    assert len(handled) == 1
    assert len(outcomes) == 1
    assert "CERTIFICATE" in outcomes[0].upper()
    assert stats.connections_accepted == 2
    assert stats.handler_errors == 0
    assert not errors


# ---------------------------------------------------------------------- bad files


def _write_pem_files(directory: Path) -> dict[str, Path]:
    """A certificate, its key (plain and under a passphrase), each in a file of its own."""
    issued = trustme.CA().issue_cert(HOSTNAME)
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    files = {
        "cert": issued.cert_chain_pems[0].bytes(),
        "key": issued.private_key_pem.bytes(),
        "encrypted_key": encrypted,
    }
    paths = {name: directory / f"{name}.pem" for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        # OpenSSL says "PEM lib" for each of these first two, naming nothing.
        ("cert", None, "'{cert}' holds no private key; give the key file as well"),
        ("key", None, "'{key}' holds no PEM certificate"),
        ("cert", "cert", "'{cert}' holds no PEM private key"),
        # OpenSSL would ask for the passphrase on the terminal, blocking the start.
        ("cert", "encrypted_key", "the private key in '{encrypted_key}' is encrypted"),
    ],
)
def test_a_certificate_or_key_that_cannot_be_used_says_which_file_and_why(
    tmp_path: Path, cert: str, key: str | None, message: str
) -> None:
    paths = _write_pem_files(tmp_path)
    with pytest.raises(ConfigurationError) as info:
        server_tls_context(str(paths[cert]), None if key is None else str(paths[key]))
    assert message.format(**{name: str(path) for name, path in paths.items()}) in str(info.value)
