"""SIGHUP from a terminal that closed stops gracefully; under nohup it stays ignored.

The terminal is a real pseudo-terminal: the server runs as the leader of a
session whose controlling terminal it is (its stdin and stdout), and the test
closes the other end, so the kernel itself hangs the terminal up and sends
SIGHUP, as it does when a terminal window closes. The reload on a SIGHUP
that did not come from a hang-up is in test_upgrade.py (one process) and
test_workers.py (the supervisor).
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import socket
import sys
from collections.abc import Iterator

import pytest
from support import NOTICE, ServerProcess, recv_exactly, recv_until_eof, subprocess_env

from threadserve._hangup import TerminalWatch, sighup_ignored

pytestmark = pytest.mark.timeout(120)

# Makes the pseudo-terminal named in argv[1] the controlling terminal of this
# process (a session leader, started so by ServerProcess), its stdin and
# stdout, then runs the rest of argv in its place (same pid).
ON_TERMINAL = (
    "import os, sys\n"
    "if os.getsid(0) != os.getpid():\n"
    "    os.setsid()\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "os.dup2(fd, 0)\n"
    "os.dup2(fd, 1)\n"
    "os.close(fd)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


@contextlib.contextmanager
def pseudo_terminal() -> Iterator[tuple[int, str]]:
    """A pseudo-terminal: the test's end (closing it hangs the terminal up) and the other's name."""
    ours, theirs = pty.openpty()
    name = os.ttyname(theirs)
    os.close(theirs)  # The server opens it by name, which makes it its controlling terminal.
    try:
        yield ours, name
    finally:
        with contextlib.suppress(OSError):
            os.close(ours)


@contextlib.contextmanager
def serve_on_terminal(name: str, *args: str) -> Iterator[ServerProcess]:
    """``threadserve serve ARGS`` with the pseudo-terminal ``name`` as its controlling terminal."""
    command = [sys.executable, "-c", ON_TERMINAL, name, sys.executable, "-m", "threadserve"]
    server = ServerProcess([*args, "--bind", "127.0.0.1:0"], command=command, env=subprocess_env())
    try:
        yield server
    finally:
        # Should a SIGHUP have started a new process by mistake, it runs in the
        # server's process group: end the whole group, not the server alone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.close()


def test_terminal_watch_sees_its_terminal_hang_up() -> None:
    ours, theirs = pty.openpty()
    pipe_r, pipe_w = os.pipe()
    try:
        watch = TerminalWatch((theirs, pipe_r))
        assert watch.attached
        assert not watch.hung_up()
        os.close(ours)
        assert watch.hung_up()
        # A descriptor that was never a terminal says nothing either way.
        assert not TerminalWatch((pipe_r, pipe_w)).attached
        assert not TerminalWatch((pipe_r, pipe_w)).hung_up()
    finally:
        for fd in (theirs, pipe_r, pipe_w):
            os.close(fd)


def test_sighup_ignored_reads_the_disposition() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert sighup_ignored()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert not sighup_ignored()
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "supervisor"])
def test_a_closed_terminal_stops_the_server_gracefully(workers: list[str]) -> None:
    with pseudo_terminal() as (ours, name), serve_on_terminal(name, *workers) as server:
        # One process says "serving on ADDR"; a supervisor "2 workers ready, serving on ADDR".
        address = server.wait_serving(timeout=60)
        with socket.create_connection(address, timeout=10) as client:
            client.sendall(b"before the hang-up\n")
            assert recv_exactly(client, 19) == b"before the hang-up\n"
            os.close(ours)  # The terminal closes: the kernel sends the server SIGHUP.
            # The stop contract: the goodbye, then a clean end of stream.
            assert recv_exactly(client, len(NOTICE)) == NOTICE
            assert recv_until_eof(client) == b""
        assert server.wait_exit(60) == 0, server.output()
        output = server.output()
    assert "SIGHUP received: the terminal is gone; stopping as for SIGTERM" in output, output
    assert "reloading" not in output, output
    assert "new workers" not in output, output
    assert "Traceback" not in output, output


def test_under_nohup_sighup_neither_stops_nor_reloads() -> None:
    command = ["nohup", sys.executable, "-m", "threadserve"]
    with ServerProcess(["--bind", "127.0.0.1:0"], command=command) as server:
        address = server.wait_serving(timeout=60)
        with socket.create_connection(address, timeout=10) as client:
            client.sendall(b"one\n")
            assert recv_exactly(client, 4) == b"one\n"
            server.send_signal(signal.SIGHUP)
            # Ignored by the kernel, so nothing to wait for: a signal that
            # does something (SIGTERM) sent after it is handled after it.
            client.sendall(b"two\n")
            assert recv_exactly(client, 4) == b"two\n"
            server.send_signal(signal.SIGTERM)
            assert recv_exactly(client, len(NOTICE)) == NOTICE
        assert server.wait_exit(60) == 0, server.output()
        output = server.output()
    assert not re.search(r"SIGHUP|reloading", output), output
