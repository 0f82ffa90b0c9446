"""examples/pg_gateway.py against a real PostgreSQL, run as a user runs it: a process, signals."""

from __future__ import annotations

import json
import select
import signal
import socket
from collections.abc import Iterator

import psycopg
import pytest
from example_process import example_process
from pg_cluster import Cluster, throwaway_cluster
from support import NOTICE, SETTLE, ServerProcess, recv_until_eof, wait_until

pytestmark = pytest.mark.timeout(90)

ROWS = 100
SLEEPING = (
    "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
    " AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'"
)
BACKENDS = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with throwaway_cluster(max_connections=40) as cluster:
        yield cluster


def gateway(cluster: Cluster, name: str, *args: str) -> ServerProcess:
    """The example in a process; its database connections are named ``name`` in the database."""
    return example_process(
        "pg_gateway",
        *("--bind", "127.0.0.1:0", "--dsn", cluster.dsn, "--demo-rows", str(ROWS)),
        *("--application-name", name, *args),
    )


@pytest.fixture(scope="module")
def address(cluster: Cluster) -> Iterator[tuple[str, int]]:
    """One gateway for the request tests; they do not stop it."""
    with gateway(cluster, "gateway requests") as server:
        yield server.wait_serving(timeout=30)


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
def client(address: tuple[str, int]) -> Iterator[Client]:
    client = Client(address)
    yield client
    client.close()


def query(cluster: Cluster, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(cluster.dsn, autocommit=True) as pg:
        return pg.execute(sql, params).fetchall()


def sleeping_backends(cluster: Cluster, name: str) -> list[int]:
    """Database backends of gateway ``name`` running a pg_sleep."""
    return [int(str(row[0])) for row in query(cluster, SLEEPING, name)]


def test_get_answers_the_row_as_one_json_line(client: Client) -> None:
    row = json.loads(client.ask(b"GET 42"))
    assert row == {"id": 42, "name": "item 42", "price": 4.2, "tags": ["demo", "group 0"]}
    # Verbs are case-insensitive; the reply is exactly one line each time.
    assert json.loads(client.ask(b"get 7"))["id"] == 7
    assert client.ask(b"PING") == b"PONG\n"


def test_unknown_id_is_an_error_line_and_the_connection_goes_on(client: Client) -> None:
    assert client.ask(b"GET 999999") == b"ERR not found\n"
    assert client.ask(b"GET 0") == b"ERR not found\n"
    assert json.loads(client.ask(b"GET 1"))["id"] == 1


def test_bad_input_gets_error_lines_and_the_server_keeps_serving(
    client: Client, address: tuple[str, int]
) -> None:
    for request in [
        b"GET",
        b"GET x",
        b"GET -1",
        b"GET 1 2",
        b"GET 99999999999999999999999",  # Beyond the integer column: no database error.
        b"SLOW",
        b"SLOW -1",
        b"SLOW 1e9",
        b"SLOW nan",
        b"FOO 1",
        b"",
        b"\xff\xfe GET",
    ]:
        assert client.ask(request).startswith(b"ERR "), request
    assert json.loads(client.ask(b"GET 3"))["id"] == 3
    # An over-long line ends that connection with a notice; others are served on.
    other = Client(address)
    try:
        other.sock.sendall(b"GET " + b"1" * 1000 + b"\n")
        assert recv_until_eof(other.sock).startswith(b"Line too long")
    finally:
        other.close()
    assert json.loads(client.ask(b"GET 4"))["id"] == 4
    assert client.ask(b"QUIT") == b"BYE\n"
    assert client.lines.readline() == b""


def test_sigterm_cancels_a_30_s_query_tells_the_client_and_exits_at_once(
    cluster: Cluster,
) -> None:
    with gateway(cluster, "gateway sigterm") as server:
        address = server.wait_serving(timeout=30)
        busy, idle = Client(address), Client(address)
        try:
            assert idle.ask(b"PING") == b"PONG\n"
            # A second request right behind the slow one: it was read before
            # the stop, so it must be answered too (with an error, not run).
            busy.sock.sendall(b"SLOW 30\nGET 1\n")
            wait_until(
                lambda: len(sleeping_backends(cluster, "gateway sigterm")) == 1,
                30,
                "the query to run",
            )
            sent_at = server.send_signal(signal.SIGTERM)
            # Each client reads to the server's EOF and closes, ending its lingering close.
            assert recv_until_eof(busy.sock) == (
                b"ERR cancelled: server stopping\nERR cancelled: server stopping\n" + NOTICE
            )
            busy.close()
            assert recv_until_eof(idle.sock) == NOTICE
            idle.close()
            assert server.wait_exit(timeout=SETTLE) == 0, server.output()
        finally:
            busy.close()
            idle.close()
        # Exit 0 above: nothing had to be forced at the end of the grace
        # period (5 s). The wall-time bound also covers a busy machine's
        # interpreter shutdown; the query alone would have taken 30 s.
        assert server.exited_at - sent_at < 25.0, server.output()
        assert "2 drained, 0 forced" in server.output()
    # The database stopped the query; it did not run on after the gateway left.
    wait_until(
        lambda: not sleeping_backends(cluster, "gateway sigterm"), SETTLE, "the query to end"
    )


def test_pool_is_sized_to_max_connections(cluster: Cluster) -> None:
    name = "gateway pool"
    with gateway(cluster, name, "--max-connections", "3") as server:
        address = server.wait_serving(timeout=30)
        assert "pool of 1 to 3 database connections" in server.output()
        clients = [Client(address) for _ in range(3)]
        waiting: Client | None = None
        try:
            for each in clients:
                each.sock.sendall(b"SLOW 30\n")
            wait_until(lambda: len(sleeping_backends(cluster, name)) == 3, 30, "three queries")
            assert query(cluster, BACKENDS, name) == [(3,)]
            # A fourth client waits in the listen queue (max_connections 3) ...
            waiting = Client(address)
            waiting.sock.sendall(b"GET 5\n")
            # ... until one of the three is done: cancel its query from the
            # database side, which the gateway reports as a plain cancel.
            query(cluster, "SELECT pg_cancel_backend(%s)", sleeping_backends(cluster, name)[0])
            readable, _, _ = select.select([each.sock for each in clients], [], [], 30)
            done = [each for each in clients if each.sock in readable]
            assert len(done) == 1
            assert done[0].lines.readline() == b"ERR cancelled\n"
            assert done[0].ask(b"QUIT") == b"BYE\n"
            assert json.loads(waiting.lines.readline())["id"] == 5
            # Still never more database connections than the pool's size.
            assert query(cluster, BACKENDS, name) == [(3,)]
            server.send_signal(signal.SIGTERM)
            for each in clients:
                if each is not done[0]:
                    assert recv_until_eof(each.sock) == b"ERR cancelled: server stopping\n" + NOTICE
                    each.close()
            assert recv_until_eof(waiting.sock) == NOTICE
            waiting.close()
            assert server.wait_exit(timeout=SETTLE) == 0, server.output()
        finally:
            for each in [*clients, *([waiting] if waiting else [])]:
                each.close()


def test_a_pool_larger_than_the_database_allows_is_refused_at_start(cluster: Cluster) -> None:
    with gateway(cluster, "gateway refused", "--max-connections", "500") as server:
        assert server.wait_exit(timeout=30) == 1
        assert "--max-connections 500 needs as many database connections" in server.output()
