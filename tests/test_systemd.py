"""systemd integration without systemd running: socket activation and the notify protocol.

Socket activation goes through systemd's own ``systemd-socket-activate``,
which binds, waits for the first client, then starts the server with the
socket as descriptor 3 (``LISTEN_FDS``, ``LISTEN_PID``, ``LISTEN_FDNAMES``).
Notify messages go to an AF_UNIX datagram socket the test owns, as systemd's
would.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import NOTICE, SETTLE, ServerProcess, free_port, recv_exactly, subprocess_env

from threadserve._systemd import Notifier, activated_sockets, resolve_binds

pytestmark = pytest.mark.timeout(90)


def activate(port: int, *args: str) -> ServerProcess:
    """``threadserve serve ARGS`` started by systemd-socket-activate on 127.0.0.1:PORT."""
    command = [
        "systemd-socket-activate",
        "--listen",
        f"127.0.0.1:{port}",
        "--fdname=web",
        "--setenv=PYTHONPATH",
        sys.executable,
        "-m",
        "threadserve",
    ]
    return ServerProcess(list(args), command=command)


def echo_once(port: int, line: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(line)
        assert recv_exactly(sock, len(line)) == line


@pytest.mark.parametrize(
    "args",
    [
        ["echo"],
        ["echo", "--bind", "systemd:web"],
        ["echo", "--bind", "fd://3", "--workers", "2"],
        ["echo", "--workers", "2"],
    ],
    ids=["alone", "by-name", "by-fd-with-workers", "with-workers"],
)
def test_socket_activation_serves_the_socket_handed_over(args: list[str]) -> None:
    port = free_port()
    with activate(port, *args) as server:
        server.wait_for_log(rf"Listening on 127\.0\.0\.1:{port}")
        # The first client is what makes systemd-socket-activate start us;
        # it waits in the queue meanwhile and is served like any other.
        echo_once(port, b"first\n")
        if "--workers" in args:
            server.wait_for_log(r"2 workers ready, serving on 127\.0\.0\.1:\d+$", timeout=30)
        for i in range(5):
            echo_once(port, f"line {i}\n".encode())
        with socket.create_connection(("127.0.0.1", port), timeout=20) as idle:
            idle.sendall(b"x\n")
            assert recv_exactly(idle, 2) == b"x\n"
            server.send_signal(signal.SIGTERM)
            assert recv_exactly(idle, len(NOTICE)) == NOTICE
        assert server.wait_exit(SETTLE) == 0, server.output()
        output = server.output()
    assert f"serving on 127.0.0.1:{port}" in output
    assert "Traceback" not in output, output


def test_activation_variables_are_read_for_this_process_only_and_cleared() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin"}
    assert activated_sockets(env) == [(3, "web"), (4, "admin")]
    assert env == {}
    assert resolve_binds(["systemd:admin", "127.0.0.1:0"], [(3, "web"), (4, "admin")]) == [
        "fd://4",
        "127.0.0.1:0",
    ]
    assert resolve_binds(None, [(3, "web")]) == ["fd://3"]
    assert resolve_binds(None, []) is None
    other = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert activated_sockets(other) == []  # Meant for another process.
    assert other == {}


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    with tempfile.TemporaryDirectory(prefix="threadserve-notify-") as folder:
        path = str(Path(folder) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        with sock:
            yield sock, path


#: Linux's SO_TIMESTAMPNS (asm-generic/socket.h), which the socket module does
#: not name: the kernel stamps each datagram as it is queued.
SO_TIMESTAMPNS = 35
TIMESPEC = struct.Struct("@qq")


class Messages:
    """Datagrams received on the notify socket, each as (arrival time, {key: value}).

    The arrival time is the kernel's, taken when the datagram was queued, not
    when this process got round to reading it: on a busy machine the reader
    may wake late, and the gaps between watchdog pings must be the sender's.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[tuple[float, dict[str, str]]] = []
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        """Read until a message with ``key`` arrives; return it."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key} in {timeout} s; got {self.received}")
            self.sock.settimeout(remaining)
            data, ancillary, _flags, _address = self.sock.recvmsg(
                4096, socket.CMSG_SPACE(TIMESPEC.size)
            )
            at = time.time()
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = TIMESPEC.unpack(payload[: TIMESPEC.size])
                    at = seconds + nanoseconds / 1e9
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.received.append((at, fields))
            if key in fields:
                return fields

    def states(self) -> list[str]:
        """The state messages in order, watchdog pings left out."""
        wanted = ("READY", "RELOADING", "STOPPING")
        return [key for _at, fields in self.received for key in fields if key in wanted]


def test_supervisor_notifies_ready_reloading_stopping_and_pings_the_watchdog(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    watchdog_usec = 1_000_000
    env = subprocess_env()
    env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC=str(watchdog_usec))
    messages = Messages(sock)
    with ServerProcess(["--bind", "127.0.0.1:0", "--workers", "2"], env=env) as server:
        ready = messages.wait_for("READY")
        assert "2 of 2 workers" in ready["STATUS"], ready
        server.send_signal(signal.SIGHUP)
        reloading = messages.wait_for("RELOADING")
        sent_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < sent_usec - int(reloading["MONOTONIC_USEC"]) < 10_000_000
        messages.wait_for("READY")
        # Watch the pings for a while (bounded): a few intervals.
        first = len(messages.received)
        while len(messages.received) - first < 6:
            messages.wait_for("WATCHDOG")
        server.send_signal(signal.SIGTERM)
        stopping = messages.wait_for("STOPPING")
        assert "stopping" in stopping["STATUS"]
        assert server.wait_exit(SETTLE) == 0, server.output()
    assert messages.states() == ["READY", "RELOADING", "READY", "STOPPING"]
    pings = [at for at, fields in messages.received if "WATCHDOG" in fields]
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    print(f"\nwatchdog gaps (WATCHDOG_USEC/2 = 0.5 s): {[round(g, 3) for g in gaps]}")
    assert 0.4 < statistics.median(gaps) < 0.65, gaps
    assert max(gaps) < watchdog_usec / 1e6, gaps  # Never late enough for systemd to kill us.


def test_single_process_notifies_ready_and_stopping(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    env = subprocess_env()
    env.update(NOTIFY_SOCKET=path)
    messages = Messages(sock)
    with ServerProcess(["--bind", "127.0.0.1:0"], env=env) as server:
        ready = messages.wait_for("READY")
        assert ready["STATUS"].startswith("serving on 127.0.0.1:")
        server.send_signal(signal.SIGTERM)
        messages.wait_for("STOPPING")
        assert server.wait_exit(SETTLE) == 0, server.output()
    assert messages.states() == ["READY", "STOPPING"]


def test_notifier_without_notify_socket_sends_nothing_and_abstract_names_work() -> None:
    assert not Notifier({}).enabled
    name = f"threadserve-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("up")
        notifier.close()
        sock.settimeout(10)
        assert sock.recv(100) == b"READY=1\nSTATUS=up"


CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


def test_the_unit_files_pass_systemd_analyze_verify_and_match_each_other(tmp_path: Path) -> None:
    """systemd's own checker, offline: any warning (an unknown key, a bad value) fails."""
    for name in ("threadserve.socket", "threadserve.service"):
        (tmp_path / name).write_text((CONTRIB / name).read_text())
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "./threadserve.socket", "./threadserve.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
    service = (CONTRIB / "threadserve.service").read_text()
    socket_unit = (CONTRIB / "threadserve.socket").read_text()
    assert "Type=notify" in service
    assert "--workers" in service
    # The service picks the socket by the name the socket unit gives it.
    name = next(
        line.split("=", 1)[1]
        for line in socket_unit.splitlines()
        if line.startswith("FileDescriptorName=")
    )
    assert f"--bind systemd:{name}" in service
