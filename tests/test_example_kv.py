"""examples/kv.py, run as its users run it (a process, signals) and driven by real Redis clients.

The clients are redis-py, and Redis's own redis-cli and redis-benchmark
(Debian package redis-tools; `make test` installs it). The request parser,
examples/resp.py, is also tested on its own, with random chunkings.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from example_process import example_process
from hypothesis import given, settings
from hypothesis import strategies as st
from support import SETTLE, ServerProcess, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import resp  # noqa: E402

pytestmark = pytest.mark.timeout(60)

MAX_BULK = 64 * 1024  # The servers here take smaller arguments than the default, to test the limit.
GOODBYE = b"-ERR server shutting down\r\n"


def kv_server(db: Path, *args: str) -> ServerProcess:
    return example_process(
        "kv", "--bind", "127.0.0.1:0", "--db", str(db), "--max-bulk", str(MAX_BULK), *args
    )


@contextlib.contextmanager
def running_kv(db: Path, *args: str) -> Iterator[tuple[ServerProcess, tuple[str, int]]]:
    with kv_server(db, *args) as server:
        yield server, server.wait_serving(timeout=30)


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """One server for the tests that do not stop it; each test uses keys of its own."""
    with running_kv(tmp_path_factory.mktemp("kv") / "kv.sqlite3") as (_server, address):
        yield address


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def client(request: pytest.FixtureRequest, address: tuple[str, int]) -> Iterator[redis.Redis]:
    """redis-py as users create it (RESP3 is its default), and asking for RESP2."""
    kwargs: dict[str, Any] = {"protocol": 2} if request.param == 2 else {}
    client = redis.Redis(*address, socket_timeout=30, **kwargs)
    yield client
    client.close()


def execute(client: redis.Redis, *args: object) -> Any:
    """Send any command through redis-py (whose execute_command is untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def redis_cli(address: tuple[str, int], *args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(
        ["redis-cli", "-h", address[0], "-p", str(address[1]), *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        check=True,
    )
    return done.stdout.decode()


class RawClient:
    """A socket speaking RESP by hand, for what client libraries never send."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=30)
        self.file = self.sock.makefile("rb")

    def reply(self) -> object:
        """One reply: str for +, Exception for -, int, bytes or None, list."""
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise EOFError(f"connection ended mid-reply: {line!r}")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body.decode()
        if kind == b"-":
            return Exception(body.decode())
        if kind == b":":
            return int(body)
        if kind == b"$":
            if int(body) < 0:
                return None
            data = self.file.read(int(body) + 2)
            return data[:-2]
        if kind == b"*":
            return [self.reply() for _ in range(int(body))]
        raise AssertionError(f"not a RESP2 reply: {line!r}")

    def at_eof(self) -> bool:
        return self.file.read() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw(address: tuple[str, int]) -> Iterator[RawClient]:
    client = RawClient(address)
    yield client
    client.close()


# ---------------------------------------------------------------------- commands, via redis-py


def test_connection_commands(client: redis.Redis) -> None:
    assert client.ping() is True
    assert client.echo(b"a\r\nb\x00c") == b"a\r\nb\x00c"
    assert client.client_setname("kv-test") is True
    assert client.client_getname() == "kv-test"
    assert isinstance(client.client_id(), int)
    assert execute(client, "SELECT", 0) in (True, b"OK")
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("appendonly") == {"appendonly": "no"}
    assert client.info()["redis_version"]
    with pytest.raises(redis.ResponseError, match="DB index is out of range"):
        execute(client, "SELECT", 1)
    with pytest.raises(redis.ResponseError, match="unknown command 'NOSUCH'"):
        execute(client, "NOSUCH", "x")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'get'"):
        execute(client, "GET")


def test_get_set_and_options(client: redis.Redis) -> None:
    key = f"set-{client.get_connection_kwargs().get('protocol')}"
    assert client.get(key) is None
    assert client.set(key, b"\x00binary\r\n") is True
    assert client.get(key) == b"\x00binary\r\n"
    assert client.set(key, "no", nx=True) is None
    assert client.get(key) == b"\x00binary\r\n"
    assert client.set(key, "yes", xx=True) is True
    assert client.get(key) == b"yes"
    assert client.set(key + ":new", "1", xx=True) is None
    assert client.get(key + ":new") is None
    assert client.set(key + ":new", "1", nx=True) is True
    assert client.set(key, "v", ex=100) is True
    assert 99 <= client.ttl(key) <= 100
    assert client.set(key, "v", px=5000) is True
    assert 4 <= client.ttl(key) <= 5
    assert client.set(key, "v") is True
    assert client.ttl(key) == -1  # A plain SET clears the time to live.
    assert client.ttl(key + ":none") == -2
    with pytest.raises(redis.ResponseError, match="syntax error"):
        execute(client, "SET", key, "v", "EX", 1, "PX", 1)
    with pytest.raises(redis.ResponseError, match="invalid expire time"):
        client.set(key, "v", ex=0)
    with pytest.raises(redis.ResponseError, match="not an integer"):
        execute(client, "SET", key, "v", "EX", "soon")


def test_expiry(client: redis.Redis) -> None:
    key = f"expiring-{client.get_connection_kwargs().get('protocol')}"
    client.set(key, "v", px=50)
    client.set(key + ":kept", "v")
    assert client.expire(key + ":kept", 100) is True
    assert 95 <= client.ttl(key + ":kept") <= 100  # Whole seconds; a busy machine may take one.
    assert client.expire(key + ":missing", 100) is False
    # Expiry is wall-clock time passing: wait for it, bounded.
    wait_until(lambda: client.get(key) is None, timeout=SETTLE, what="the key to expire")
    assert client.exists(key) == 0
    assert client.ttl(key) == -2
    assert client.delete(key) == 0  # An expired key is gone for every command.
    assert client.set(key, "again", nx=True) is True
    assert client.expire(key, 0) is True  # A time in the past deletes.
    assert client.get(key) is None


def test_delete_exists_and_multi_keys(client: redis.Redis) -> None:
    prefix = f"multi-{client.get_connection_kwargs().get('protocol')}"
    keys = [f"{prefix}:{i}" for i in range(600)]  # More than one SQL statement's worth.
    assert client.mset({key: str(i) for i, key in enumerate(keys)}) is True
    values = client.mget([*keys, prefix + ":missing"])
    assert values == [str(i).encode() for i in range(600)] + [None]
    assert client.exists(keys[0], keys[0], keys[1], prefix + ":missing") == 3
    assert client.delete(*keys[:10], prefix + ":missing", keys[0]) == 10
    assert client.exists(*keys[:10]) == 0
    assert client.delete(*keys) == 590
    with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'mset'"):
        execute(client, "MSET", "a", "1", "b")


def test_counters(client: redis.Redis) -> None:
    key = f"counter-{client.get_connection_kwargs().get('protocol')}"
    client.delete(key)
    assert client.incr(key) == 1
    assert client.incrby(key, 41) == 42
    assert client.decr(key) == 41
    assert client.incrby(key, -50) == -9
    assert client.get(key) == b"-9"
    client.set(key, 2**63 - 1)
    with pytest.raises(redis.ResponseError, match="overflow"):
        client.incr(key)
    client.set(key, "ten")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        client.incr(key)
    client.set(key, 5, ex=100)
    assert client.incr(key) == 6
    assert client.ttl(key) > 0  # INCR keeps the time to live, as in Redis.


def test_dbsize_and_flushdb(tmp_path: Path) -> None:
    with running_kv(tmp_path / "kv.sqlite3") as (_server, address):
        client = redis.Redis(*address, socket_timeout=30)
        try:
            assert client.dbsize() == 0
            client.mset({"a": 1, "b": 2, "c": 3})
            client.set("d", 4, px=1)
            wait_until(lambda: client.get("d") is None, timeout=SETTLE, what="d to expire")
            assert client.dbsize() == 3  # Expired keys do not count.
            assert client.flushdb() is True
            assert client.dbsize() == 0
            assert client.get("a") is None
        finally:
            client.close()


# ---------------------------------------------------------------------- pipelining and the protocol


def test_redis_py_pipeline_answers_in_order(client: redis.Redis) -> None:
    key = f"pipelined-{client.get_connection_kwargs().get('protocol')}"
    pipe = client.pipeline(transaction=False)
    pipe.delete(key)
    for i in range(300):
        pipe.incr(key)
        pipe.set(f"{key}:{i}", i)
        pipe.get(f"{key}:{i}")
    results = pipe.execute()
    assert results[0] in (0, 1)
    for i in range(300):
        assert results[1 + 3 * i : 4 + 3 * i] == [i + 1, True, str(i).encode()]


def test_raw_pipeline_and_inline_commands(raw: RawClient) -> None:
    # 2,000 commands in one send, array and inline forms mixed: replies in order.
    requests = bytearray(b"*2\r\n$3\r\nDEL\r\n$3\r\nraw\r\n")
    for i in range(1000):
        requests += b"*2\r\n$4\r\nINCR\r\n$3\r\nraw\r\n" if i % 2 else b"INCR raw\r\n"
        requests += b"ECHO %d\n" % i  # A bare \n ends an inline command too.
    requests += b'\r\nSET raw:quoted "a b\\x41\\n" \r\nGET raw:quoted\r\nPING\r\n'
    raw.sock.sendall(requests)
    assert raw.reply() in (0, 1)
    for i in range(1000):
        assert (raw.reply(), raw.reply()) == (i + 1, str(i).encode())
    assert [raw.reply(), raw.reply(), raw.reply()] == ["OK", b"a bA\n", "PONG"]
    raw.sock.sendall(b"*2\r\n$4\r\nPING\r\n$2\r\nhi\r\n")
    assert raw.reply() == b"hi"


@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        (b"*x\r\n", "invalid multibulk length"),
        (b"*1\r\n+GET\r\n", "expected '$', got '+'"),
        (b"*1\r\n$2\r\nGET\r\n", "bulk string not terminated by CRLF"),
        (b'SET k "unbalanced\r\n', "unbalanced quotes"),
        (b"GET " + b"k" * (70 * 1024), "too big inline request"),
        (b"*2\r\n$3\r\nGET\r\n$%d\r\n" % (MAX_BULK + 1), "over the limit of 65536"),
        (b"*2000000\r\n", "2000000 arguments, over the limit"),
    ],
    ids=["count", "type", "terminator", "quotes", "inline-size", "bulk-size", "array-size"],
)
def test_protocol_error_answers_then_closes(
    raw: RawClient, request_bytes: bytes, message: str
) -> None:
    # What came before the error is answered, then the error, then the end:
    # for an oversized bulk, as soon as its header announces the size.
    raw.sock.sendall(b"PING\r\n" + request_bytes)
    assert raw.reply() == "PONG"
    error = raw.reply()
    assert isinstance(error, Exception)
    assert str(error).startswith("ERR Protocol error: ")
    assert message in str(error)
    assert raw.at_eof()


def test_redis_py_oversized_value_is_an_error(client: redis.Redis) -> None:
    with pytest.raises(redis.ResponseError, match="Protocol error: bulk length"):
        client.set("too-big", b"x" * (MAX_BULK + 1))
    assert client.ping() is True  # redis-py reconnects; the server serves on.
    assert client.get("too-big") is None


def test_binary_arguments_everywhere(raw: RawClient) -> None:
    """Bytes that are not UTF-8, where the server echoes names back in errors or matches them."""
    for command in ([b"\xff\xfe"], [b"HELLO", b"3", b"\xff"], [b"CLIENT", b"\xff"]):
        raw.sock.sendall(b"*%d\r\n" % len(command) + b"".join(resp.bulk(a) for a in command))
        assert isinstance(raw.reply(), Exception)
    raw.sock.sendall(b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$1\r\n\xff\r\nPING\r\n")
    assert [raw.reply(), raw.reply()] == [[], "PONG"]


def test_quit(raw: RawClient) -> None:
    raw.sock.sendall(b"PING\r\nQUIT\r\nPING\r\n")
    assert [raw.reply(), raw.reply()] == ["PONG", "OK"]
    assert raw.at_eof()


# ---------------------------------------------------------------------- Redis's own tools


def test_redis_cli(address: tuple[str, int]) -> None:
    assert redis_cli(address, "PING") == "PONG\n"
    assert redis_cli(address, "SET", "cli", "hello world") == "OK\n"
    assert redis_cli(address, "GET", "cli") == "hello world\n"
    assert redis_cli(address, "INCRBY", "cli:n", "5") == "5\n"
    assert redis_cli(address, "GET", "cli:missing") == "\n"
    assert "unknown command" in redis_cli(address, "NOSUCH")
    # Commands on stdin, one per line, as a person pipes them in.
    typed = b'SET cli:typed "two words"\nGET cli:typed\nDEL cli:typed\nPING\n'
    assert redis_cli(address, stdin=typed) == "OK\ntwo words\n1\nPONG\n"


def test_redis_cli_pipe_mass_insert(address: tuple[str, int]) -> None:
    # redis-cli --pipe, Redis's documented mass insertion: 5,000 commands in
    # the protocol, then its own ECHO to find the end of the replies.
    commands = b"".join(
        b"*3\r\n$3\r\nSET\r\n$%d\r\nmass:%d\r\n$%d\r\n%d\r\n"
        % (len(b"mass:%d" % i), i, len(b"%d" % i), i)
        for i in range(5000)
    )
    output = redis_cli(address, "--pipe", stdin=commands)
    assert "errors: 0, replies: 5000" in output
    client = redis.Redis(*address, socket_timeout=30)
    try:
        assert client.mget([f"mass:{i}" for i in (0, 2500, 4999)]) == [b"0", b"2500", b"4999"]
    finally:
        client.close()


@pytest.mark.parametrize("pipeline", [1, 16], ids=["plain", "P16"])
def test_redis_benchmark(address: tuple[str, int], pipeline: int) -> None:
    tests = "ping_inline,ping_mbulk,set,get,incr,mset"
    done = subprocess.run(
        [
            *("redis-benchmark", "-h", address[0], "-p", str(address[1])),
            *("-n", "2000", "-c", "10", "-P", str(pipeline), "-t", tests, "--csv"),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    output = done.stdout.decode()
    assert "error" not in (output + done.stderr.decode()).lower(), output
    rows = {line.split(",")[0].strip('"'): line for line in output.splitlines()[1:]}
    assert set(rows) == {"PING_INLINE", "PING_MBULK", "SET", "GET", "INCR", "MSET (10 keys)"}
    for name, row in rows.items():
        assert float(row.split(",")[1].strip('"')) > 0, f"{name}: {row}"


# ---------------------------------------------------------------------- stopping and durability


def pipelined_writes_until_stopped(
    address: tuple[str, int], signal_after: int, started: threading.Event
) -> tuple[int, bytes]:
    """SET k:0, k:1, ... in pipelined batches of 20, until the server ends the connection.

    Sets ``started`` once ``signal_after`` writes were acknowledged (the test
    then signals the server) and keeps writing. Returns how many writes were
    acknowledged, and what the server sent after the last acknowledgement.
    """
    acknowledged, sent, received = 0, 0, bytearray()
    with socket.create_connection(address, timeout=30) as sock:
        while sent < 200_000:
            batch = b"".join(b"SET k:%d v%d\r\n" % (i, i) for i in range(sent, sent + 20))
            try:
                sock.sendall(batch)
            except OSError:
                break  # The server is gone; what it acknowledged is what counts.
            sent += len(batch.splitlines())
            ended = False
            while acknowledged < sent and not ended:
                while received.startswith(b"+OK\r\n"):
                    del received[:5]
                    acknowledged += 1
                if acknowledged == sent:
                    break
                if not b"+OK\r\n".startswith(received[:5]):
                    ended = True  # Not an acknowledgement: the goodbye notice.
                    break
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                ended = not chunk
                received += chunk
            if acknowledged >= signal_after:
                started.set()
            if ended:
                break
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):  # The rest of the notice, up to the end.
                received += chunk
    return acknowledged, bytes(received)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_acknowledged_writes_survive_a_restart(tmp_path: Path, signum: int) -> None:
    db = tmp_path / "kv.sqlite3"
    stop = threading.Event()
    outcome: list[tuple[int, bytes]] = []
    with running_kv(db) as (server, address):
        writer = threading.Thread(
            target=lambda: outcome.append(pipelined_writes_until_stopped(address, 500, stop))
        )
        writer.start()
        try:
            assert stop.wait(30), "the writes never got going"
            server.send_signal(signum)
        finally:
            writer.join(30)
        exit_code = server.wait_exit(timeout=SETTLE)
    acknowledged, after = outcome[0]
    assert acknowledged >= 500
    if signum == signal.SIGTERM:
        assert exit_code == 0
        assert after == GOODBYE  # The stop notice comes after the last reply.
    with running_kv(db) as (_server, address):
        client = redis.Redis(*address, socket_timeout=30)
        try:
            keys = [f"k:{i}" for i in range(acknowledged)]
            values = client.mget(keys)
            missing = [key for key, value in zip(keys, values, strict=True) if value is None]
            assert not missing, f"{len(missing)} acknowledged writes lost, first {missing[:5]}"
            assert values[-1] == f"v{acknowledged - 1}".encode()
        finally:
            client.close()


def test_stop_notice_is_a_redis_error(tmp_path: Path) -> None:
    with running_kv(tmp_path / "kv.sqlite3") as (server, address):
        # A connection as redis-py holds it between commands.
        connection = redis.Connection(*address, socket_timeout=30)  # type: ignore[no-untyped-call]
        connection.connect()  # type: ignore[no-untyped-call]
        connection.send_command("SET", "before-stop", "1")  # type: ignore[no-untyped-call]
        assert connection.read_response() == b"OK"
        server.send_signal(signal.SIGTERM)
        with pytest.raises(redis.ResponseError, match="server shutting down"):
            connection.read_response()
        connection.disconnect()  # type: ignore[no-untyped-call]  # The server lingers until the client closes.
        assert server.wait_exit(timeout=SETTLE) == 0


# ---------------------------------------------------------------------- the parser alone

COMMANDS = st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=5), max_size=20)


def encode(command: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(command) + b"".join(resp.bulk(arg) for arg in command)


@settings(max_examples=100, deadline=None)
@given(commands=COMMANDS, cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_parser_any_chunking(commands: list[list[bytes]], cuts: list[int]) -> None:
    """However the bytes are split across reads, the same commands come out, in order."""
    stream = b"".join(encode(command) for command in commands)
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    parser = resp.RequestParser()
    parsed: list[list[bytes]] = []
    for start, end in itertools.pairwise(points):
        parser.feed(stream[start:end])
        parsed.extend(parser.commands())
    assert parsed == commands
    assert parser.idle


@given(words=st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=6))
def test_inline_quoting_round_trip(words: list[bytes]) -> None:
    """Any word, quoted with escapes as redis-cli would, comes back as it was."""

    def quote(word: bytes) -> bytes:
        return b'"' + b"".join(b"\\x%02x" % byte for byte in word) + b'"'

    assert resp.split_inline(b" ".join(quote(word) for word in words)) == words
