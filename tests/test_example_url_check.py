"""examples/url_check.py against a local HTTP server (loopback only): statuses, errors, stop."""

from __future__ import annotations

import contextlib
import http.server
import signal
import socket
import threading
from collections.abc import Iterator

import pytest
import url_check
from example_process import example_process
from support import NOTICE, SETTLE, recv_until_eof

from threadserve.testing import RunningServer, running_server

pytestmark = pytest.mark.timeout(60)

#: How long the local web server holds a stalled reply at most (a bound, not a wait).
STALL_LIMIT = 30.0


class WebHandler(http.server.BaseHTTPRequestHandler):
    """Paths: /size/N (N bytes), /missing (404), /redirect, /loop, /stall-headers, /stall-body."""

    protocol_version = "HTTP/1.1"  # Keep-alive, so session reuse shows.
    server: Web

    def do_GET(self) -> None:
        web = self.server
        if self.path.startswith("/size/"):
            self.reply(200, b"x" * int(self.path.removeprefix("/size/")))
        elif self.path == "/missing":
            self.reply(404, b"not here")
        elif self.path == "/redirect":
            self.reply(302, b"", location="/size/10")
        elif self.path == "/loop":
            self.reply(302, b"", location="/loop")
        elif self.path == "/stall-headers":
            web.stalled.set()
            web.release.wait(STALL_LIMIT)
            with contextlib.suppress(OSError):  # The client may be long gone.
                self.reply(200, b"late")
        elif self.path == "/stall-body":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            web.stalled.set()
            web.release.wait(STALL_LIMIT)
            self.close_connection = True
        else:
            self.reply(400, b"unknown path")

    def reply(self, status: int, body: bytes, location: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if location:
            self.send_header("Location", location)
        self.end_headers()
        self.wfile.write(body)

    def setup(self) -> None:
        with self.server.lock:
            self.server.connections += 1
        super().setup()

    def log_message(self, format: str, *args: object) -> None:
        pass  # Quiet: the tests look at replies, not at this server's log.


class Web(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), WebHandler)
        self.lock = threading.Lock()
        self.connections = 0  # TCP connections accepted.
        self.stalled = threading.Event()  # A stalling path has been reached.
        self.release = threading.Event()  # Lets stalled replies go on.

    def url(self, path: str) -> bytes:
        return f"http://127.0.0.1:{self.server_address[1]}{path}".encode()


@pytest.fixture
def web() -> Iterator[Web]:
    server = Web()
    thread = threading.Thread(target=server.serve_forever, name="local web server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def checker() -> Iterator[RunningServer]:
    with running_server(url_check.Checker(2.0, 10.0, 100_000), grace=10.0) as server:
        yield server


class Client:
    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=30)
        self.lines = self.sock.makefile("rb")

    def ask(self, request: bytes) -> bytes:
        self.sock.sendall(request + b"\n")
        return self.lines.readline()

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


@pytest.fixture
def client(checker: RunningServer) -> Iterator[Client]:
    client = Client(checker.tcp_address)
    yield client
    client.close()


def test_answers_status_and_body_length(web: Web, client: Client) -> None:
    assert client.ask(web.url("/size/5120")) == b"200 5120\n"
    assert client.ask(web.url("/size/0")) == b"200 0\n"
    assert client.ask(web.url("/missing")) == b"404 8\n"
    assert client.ask(web.url("/redirect")) == b"200 10\n"  # Redirects are followed.


def test_one_session_per_thread_reuses_its_connection(web: Web, checker: RunningServer) -> None:
    first, second = Client(checker.tcp_address), Client(checker.tcp_address)
    try:
        for size in (1, 2, 3):
            assert first.ask(web.url(f"/size/{size}")) == f"200 {size}\n".encode()
        assert web.connections == 1  # Three requests, one keep-alive connection.
        assert second.ask(web.url("/size/4")) == b"200 4\n"
        assert web.connections == 2  # Another client thread, another session.
    finally:
        first.close()
        second.close()


def test_errors_are_lines_and_the_connection_goes_on(web: Web, client: Client) -> None:
    with socket.socket() as unused:  # A loopback port with no listener: refused.
        unused.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{unused.getsockname()[1]}/".encode()
        assert client.ask(refused) == b"ERR connection failed\n"
    assert (
        client.ask(b"ftp://127.0.0.1/")
        == b"ERR bad url: expected one http:// or https:// URL per line\n"
    )
    assert client.ask(b"not a url").startswith(b"ERR bad url")
    assert client.ask(b"http://[::1") == b"ERR bad url\n"
    assert client.ask(web.url("/loop")) == b"ERR too many redirects\n"
    assert client.ask(web.url("/size/200000")) == b"ERR body larger than 100000 bytes\n"
    assert client.ask(web.url("/size/7")) == b"200 7\n"


def test_read_timeout(web: Web) -> None:
    with running_server(url_check.Checker(2.0, 0.3, 1000)) as server:
        client = Client(server.tcp_address)
        try:
            assert client.ask(web.url("/stall-headers")) == b"ERR read timeout\n"
            assert client.ask(web.url("/size/1")) == b"200 1\n"
        finally:
            client.close()


@pytest.mark.parametrize("path", ["/stall-headers", "/stall-body"])
def test_stop_abandons_the_request_in_flight_and_tells_the_client(
    web: Web, checker: RunningServer, path: str
) -> None:
    client = Client(checker.tcp_address)
    try:
        client.sock.sendall(web.url(path) + b"\n")
        assert web.stalled.wait(STALL_LIMIT)
        stopping = threading.Thread(target=checker.stop, name="stop in background")
        stopping.start()
        assert recv_until_eof(client.sock) == url_check.CANCELLED + NOTICE
        client.close()
        stopping.join(STALL_LIMIT)
    finally:
        client.close()
    report = checker.stop()
    assert report is not None
    # Clean: the handler returned well before the 10 s grace; the web server
    # still holds its reply (it would for 30 s).
    assert report.clean, report
    assert report.duration < 5.0, report
    assert not web.release.is_set()


def test_sigterm_in_a_process_with_a_request_in_flight(web: Web) -> None:
    with example_process("url_check", "--bind", "127.0.0.1:0") as server:
        client = Client(server.wait_serving(timeout=30))
        try:
            client.sock.sendall(web.url("/stall-body") + b"\n")
            assert web.stalled.wait(STALL_LIMIT)
            sent_at = server.send_signal(signal.SIGTERM)
            assert recv_until_eof(client.sock) == url_check.CANCELLED + NOTICE
            client.close()
            assert server.wait_exit(timeout=SETTLE) == 0, server.output()
        finally:
            client.close()
        # Exit 0 already says the stop drained within the 5 s grace (a forced
        # stop exits 3); the web server would have stalled for 30 s. The wall
        # time also covers interpreter shutdown, slow on a busy machine.
        assert server.exited_at - sent_at < 25.0, server.output()
