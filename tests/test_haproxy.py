"""Two threadserve instances behind a real HAProxy (TCP mode), restarted one after the other.

HAProxy sends the PROXY header (``send-proxy-v2``, then ``send-proxy`` for
v1), health-checks each instance (``check``: LOCAL headers) and asks each
one's agent how it is (``agent-check``). Sixteen clients, each bound to its
own 127.0.0.x, connect, read the address the server reports for them, send a
line, read it back and close, without pause, while each instance in turn is
sent SIGTERM and started again. Every session ends one of these ways:

* served: the right address, then the echo;
* refused: the connect failed, or HAProxy closed without a reply;
* reset: a connection reset or broken pipe;
* told: the server's goodbye notice instead of the reply.

With a drain delay, the agent says ``drain`` first and HAProxy moves new
clients to the other instance, so the stop finds nobody: all are served.
Without it, clients in the middle of a session are told (the stop contract:
they hear goodbye, never a reset), and HAProxy's retries with redispatch
take care of the refused connects.

Needs the Debian package ``haproxy`` (scripts/system-packages installs it).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import NOTICE, SETTLE, ServerProcess, free_port, wait_until

from threadserve._agent import AgentResponder

CLIENTS = 16
#: How long each instance drains. HAProxy sees ``drain`` within an agent
#: interval (100 ms here), but the sessions it had already sent the instance
#: must end before the stop or they are told goodbye: with sixteen client
#: threads in one process on a busy machine, one session can take a second
#: or more. A drain that does not work still fails the drained run, whatever
#: the delay: HAProxy keeps sending clients until the instance goes away.
DRAIN_DELAY = 5.0
#: Sessions per client at most; the load also stops once the restarts are done.
MAX_SESSIONS = 20_000


class Instance:
    """One threadserve process on fixed ports, so it can be started again in the same place."""

    def __init__(self, name: str, proxy: str, drain: bool, workers: int | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.agent_port = free_port()
        self.args = [
            "proxy_handlers:tell_peer",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--proxy-protocol",
            proxy,
            "--agent-bind",
            f"127.0.0.1:{self.agent_port}",
            "--drain-delay",
            str(DRAIN_DELAY if drain else 0),
            "--grace",
            "5",
            "--log-level",
            "warning",
            # With workers the supervisor answers the agent and drains.
            *([] if workers is None else ["--workers", str(workers)]),
        ]
        self.process: ServerProcess | None = None
        self.outputs: list[str] = []

    def start(self) -> None:
        self.process = ServerProcess(self.args)

    def wait_serving(self) -> None:
        """Until its agent answers (it starts with the server; logging is at warning level)."""

        def answers() -> bool:
            assert self.process is not None
            if self.process.exited.is_set():
                raise AssertionError(f"{self.name} exited:\n{self.process.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.agent_port), timeout=5) as s:
                    return s.recv(100) == b"up ready\n"
            except OSError:
                return False

        wait_until(answers, timeout=30, what=f"{self.name} to serve")

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait_exit(30)
        self.close()
        return code

    def close(self) -> None:
        if self.process is not None:
            self.outputs.append(self.process.output())
            self.process.close()
            self.process = None


class HAProxy:
    def __init__(self, directory: Path, instances: list[Instance], send_proxy: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.front = free_port()
        self.stats_socket = directory / "haproxy.sock"
        servers = "\n".join(
            f"    server {i.name} 127.0.0.1:{i.port} {send_proxy} check inter 100ms fall 1 rise 1"
            f" agent-check agent-port {i.agent_port} agent-inter 100ms"
            for i in instances
        )
        config = directory / "haproxy.cfg"
        config.write_text(
            encoding="utf-8",
            data=f"""\
global
    stats socket {self.stats_socket} level admin
    maxconn 2000

defaults
    mode tcp
    timeout connect 1s
    timeout client 20s
    timeout server 20s
    retries 3
    option redispatch 1

frontend front
    bind 127.0.0.1:{self.front}
    default_backend back

backend back
    balance roundrobin
{servers}
""",
        )
        self.process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def status(self) -> dict[str, str]:
        """Each server's status as HAProxy sees it: UP, DOWN, DRAIN, ..."""
        if not self.stats_socket.exists():
            return {}
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            try:
                sock.connect(str(self.stats_socket))
            except (ConnectionRefusedError, FileNotFoundError):
                return {}
            sock.sendall(b"show stat\n")
            data = bytearray()
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        columns = lines[0][2:].split(",")
        result = {}
        for line in lines[1:]:
            row = dict(zip(columns, line.split(","), strict=False))
            if row.get("pxname") == "back" and row.get("svname") not in ("BACKEND", None):
                result[row["svname"]] = row["status"]
        return result

    def wait_status(self, name: str, status: str) -> None:
        """Until HAProxy reports ``status`` for ``name`` (a prefix: "DRAIN (agent)" is DRAIN)."""
        wait_until(
            lambda: self.status().get(name, "").startswith(status),
            timeout=SETTLE,
            what=f"HAProxy to see {name} {status}",
            state=self.status,
        )

    def close(self) -> str:
        self.process.terminate()
        try:
            output, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate(timeout=10)
        return output.decode(errors="replace")


class Load:
    """CLIENTS threads, each from its own 127.0.0.x, in sessions without pause."""

    def __init__(self, front: int) -> None:
        self.front = front
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.oddities: list[str] = []
        self.threads = [
            threading.Thread(target=self._client, args=(f"127.0.0.{10 + n}",), name=f"client {n}")
            for n in range(CLIENTS)
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def served(self) -> int:
        with self.lock:
            return self.counts["served"]

    def _client(self, source: str) -> None:
        for _ in range(MAX_SESSIONS):
            if self.stop.is_set():
                return
            outcome, detail = self._session(source)
            with self.lock:
                self.counts[outcome] += 1
                if detail and len(self.oddities) < 20:
                    self.oddities.append(detail)

    def _session(self, source: str) -> tuple[str, str]:
        sock = socket.socket()
        try:
            sock.settimeout(20)
            sock.bind((source, 0))
            try:
                sock.connect(("127.0.0.1", self.front))
            except ConnectionRefusedError:
                return "refused", ""
            reader = LineReader(sock)
            host, port = sock.getsockname()
            try:
                first = reader.line()
                if first != f"{host}:{port}\n".encode():
                    return classify(first, f"{source} expected its own address, got {first!r}")
                sock.sendall(b"hello\n")
                second = reader.line()
                if second != b"hello\n":
                    return classify(second, f"{source} expected its echo, got {second!r}")
            except (ConnectionResetError, BrokenPipeError) as exc:
                return "reset", f"{source}: {exc!r}"
            return "served", ""
        finally:
            sock.close()


def classify(line: bytes, detail: str) -> tuple[str, str]:
    if line == NOTICE:
        return "told", ""
    if line == b"":
        return "refused", detail
    return "wrong", detail


class LineReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def line(self) -> bytes:
        """The next line, or what is left (maybe b"") at end of stream."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                rest = bytes(self.buffer)
                self.buffer.clear()
                return rest
            self.buffer += chunk
        end = self.buffer.index(b"\n") + 1
        line = bytes(self.buffer[:end])
        del self.buffer[:end]
        return line


@contextlib.contextmanager
def cluster(
    tmp_path: Path, proxy: str, drain: bool, workers: int | None = None
) -> Iterator[tuple[HAProxy, list[Instance]]]:
    instances = [Instance(f"s{n}", proxy, drain, workers) for n in (1, 2)]
    haproxy = None
    try:
        for instance in instances:
            instance.start()
        for instance in instances:
            instance.wait_serving()
        send_proxy = "send-proxy-v2" if proxy == "v2" else "send-proxy"
        haproxy = HAProxy(tmp_path, instances, send_proxy)
        for instance in instances:
            # Up: the health checks (a LOCAL header with v2) are accepted,
            # and the agent says "up ready".
            haproxy.wait_status(instance.name, "UP")
        yield haproxy, instances
    finally:
        if haproxy is not None:
            haproxy.close()
        for instance in instances:
            instance.close()


def rolling_restart(
    tmp_path: Path, proxy: str, drain: bool, workers: int | None = None
) -> Counter[str]:
    with (
        cluster(tmp_path, proxy, drain, workers) as (haproxy, instances),
        Load(haproxy.front) as load,
    ):
        wait_until(lambda: load.served() >= 200, timeout=30, what="the load to get going")
        for instance in instances:
            assert instance.process is not None
            instance.process.send_signal(signal.SIGTERM)
            if drain:
                # The agent says drain, and HAProxy takes it out of rotation.
                haproxy.wait_status(instance.name, "DRAIN")
            assert instance.process.wait_exit(30) == 0, instance.process.output()
            instance.close()
            instance.start()
            instance.wait_serving()
            haproxy.wait_status(instance.name, "UP")
        # Both restarted and back: a little more load through both, then stop it.
        settled = load.served() + 200
        wait_until(lambda: load.served() >= settled, timeout=30, what="load after the restarts")
    for instance in instances:
        logs = "".join(instance.outputs)
        # Health checks and traffic alike were accepted: no header was rejected.
        assert "PROXY protocol" not in logs, logs
    counts = Counter({key: load.counts[key] for key in ("served", "refused", "reset", "told")})
    counts.update({k: v for k, v in load.counts.items() if k not in counts})
    shape = "" if workers is None else f", {workers} workers each"
    print(f"rolling restart, PROXY {proxy}, drain {drain}{shape}: {dict(counts)}")
    assert not load.oddities or all("expected its echo" in o for o in load.oddities), load.oddities
    return counts


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("proxy", ["v2", "v1"])
def test_rolling_restart(tmp_path: Path, proxy: str) -> None:
    started = time.monotonic()
    drained = rolling_restart(tmp_path / "drain", proxy, drain=True)
    assert drained["served"] > 0
    assert drained["wrong"] == 0
    assert (drained["refused"], drained["reset"], drained["told"]) == (0, 0, 0), drained
    plain = rolling_restart(tmp_path / "plain", proxy, drain=False)
    assert plain["served"] > 0
    assert plain["wrong"] == 0
    assert (plain["refused"], plain["reset"]) == (0, 0), plain
    print(f"PROXY {proxy}: both runs in {time.monotonic() - started:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rolling_restart_of_instances_with_workers(tmp_path: Path) -> None:
    """Each instance a supervisor with two workers: its agent says drain, then it stops."""
    drained = rolling_restart(tmp_path / "drain", "v2", drain=True, workers=2)
    assert drained["served"] > 0
    assert drained["wrong"] == 0
    assert (drained["refused"], drained["reset"], drained["told"]) == (0, 0, 0), drained


def stat_rows(stats_socket: Path) -> list[dict[str, str]]:
    """HAProxy's ``show stat``, one dict per row (empty until HAProxy answers)."""
    if not stats_socket.exists():
        return []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        try:
            sock.connect(str(stats_socket))
        except (ConnectionRefusedError, FileNotFoundError):
            return []
        sock.sendall(b"show stat\n")
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    if not lines or not lines[0].startswith("# "):
        return []
    columns = lines[0][2:].split(",")
    return [dict(zip(columns, line.split(","), strict=False)) for line in lines[1:]]


@pytest.mark.timeout(120)
def test_agent_send_string_is_read_and_every_check_closes_cleanly(tmp_path: Path) -> None:
    """HAProxy's ``agent-send``: a string after connecting, before it reads our answer.

    The responder reads and drops it (however it lands against our answer)
    and ends every check at the checker's EOF or reset: none is closed with
    unread bytes, which would reset HAProxy's end. HAProxy follows the
    answers: DRAIN while the responder drains, out of it once ready again.
    """
    agent = AgentResponder("127.0.0.1:0")
    agent.start()
    agent_port = int(agent.addresses[0].rpartition(":")[2])
    # The server's own port: a listener nobody talks to (no ``check``, no traffic).
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen()
    stats_socket = tmp_path / "haproxy.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        encoding="utf-8",
        data=f"""\
global
    stats socket {stats_socket} level admin

defaults
    mode tcp
    timeout connect 1s
    timeout client 5s
    timeout server 5s

backend back
    server s1 127.0.0.1:{target.getsockname()[1]} agent-check agent-port {agent_port} \
agent-inter 50ms agent-send "ready?\\n"
""",
    )
    haproxy = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def server_row() -> dict[str, str]:
        for row in stat_rows(stats_socket):
            if row.get("pxname") == "back" and row.get("svname") == "s1":
                return row
        return {}

    def draining() -> bool:
        # No ``check``: the status is "no check" until the agent says drain.
        return server_row().get("status", "").startswith("DRAIN")

    try:
        wait_until(lambda: agent.answered >= 10, what="ten agent checks", state=server_row)
        agent.drain()
        wait_until(draining, what="HAProxy to see s1 DRAIN", state=server_row)
        agent.ready()
        wait_until(lambda: not draining(), what="s1 out of DRAIN", state=server_row)
        settled = agent.answered + 20
        wait_until(lambda: agent.answered >= settled, what="twenty more checks", state=server_row)
        row = server_row()
        answered, clean, early = agent.answered, agent.closed_clean, agent.closed_early
        print(
            f"agent-send: {answered} checks answered, {clean} closed at the checker's end,"
            f" {early} closed early; HAProxy agent_status {row.get('agent_status')}"
            f" {row.get('agent_desc')!r}"
        )
        assert early == 0
        # All but the ones in flight ended at HAProxy's end of the check.
        assert clean >= answered - 2
        assert row.get("agent_status") == "L7OK", row
    finally:
        output = haproxy.communicate(timeout=1)[0] if haproxy.poll() is not None else b""
        if not output:
            haproxy.terminate()
            output = haproxy.communicate(timeout=10)[0]
        agent.close()
        target.close()
    # HAProxy logs a failed agent check ("Agent check for server ... failed").
    assert b"failed" not in output, output.decode(errors="replace")
