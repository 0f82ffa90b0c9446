"""SIGHUP in a terminal stops gracefully; under nohup it stays ignored (see _hangup.py).

The terminal is a real pseudo-terminal: the server runs as the leader of a
session whose controlling terminal it is (its stdin and stdout), and closing
the test's end makes the kernel hang the terminal up and send SIGHUP, as when
a terminal window closes. SIGHUP without a terminal (a reload) is tested in
test_upgrade.py (one process) and test_workers.py (the supervisor).
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    GATED_ECHO_MODULE,
    NOTICE,
    ServerProcess,
    recv_exactly,
    recv_until_eof,
    subprocess_env,
)

from threadserve import _hangup
from threadserve._hangup import sighup_ignored
from threadserve._signals import stop_on_signals

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


class PseudoTerminal:
    """A pseudo-terminal: the test's end (closing it hangs the terminal up) and the other's name."""

    def __init__(self) -> None:
        self._ours, theirs = pty.openpty()
        self.name = os.ttyname(theirs)
        os.close(theirs)  # The server opens it by name, which makes it its controlling terminal.

    def hang_up(self) -> None:
        if self._ours >= 0:
            os.close(self._ours)
            self._ours = -1


@contextlib.contextmanager
def on_terminal(command: list[str]) -> Iterator[list[str]]:
    """``command`` run with a new pseudo-terminal as its controlling terminal; hung up after."""
    terminal = PseudoTerminal()
    try:
        yield [sys.executable, "-c", ON_TERMINAL, terminal.name, *command]
    finally:
        terminal.hang_up()


def test_a_process_on_a_terminal_has_a_controlling_terminal_and_one_without_has_none() -> None:
    # The answer goes to stderr: on the terminal, stdout is the terminal itself.
    probe = [
        sys.executable,
        "-c",
        "import sys; from threadserve._hangup import has_controlling_terminal as has; "
        "print(has(), file=sys.stderr)",
    ]

    def run(command: list[str]) -> str:
        done = subprocess.run(
            command, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=subprocess_env(),
            timeout=60, start_new_session=True, check=True, text=True,
        )  # fmt: skip
        return done.stderr.strip()

    with on_terminal(probe) as command:
        assert run(command) == "True"
    assert run(probe) == "False"


def test_sighup_ignored_reads_the_disposition() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert sighup_ignored()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert not sighup_ignored()
    finally:
        signal.signal(signal.SIGHUP, previous)


def end_process_group(server: ServerProcess) -> None:
    """Kill the server's whole process group: a new process started by mistake runs in it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)
    server.close()


class Requests:
    """What stop_on_signals asked for, in order."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def stop(self) -> None:
        self.asked.append("stop")

    def force(self) -> None:
        self.asked.append("force")


@contextlib.contextmanager
def stopping_on_signals(monkeypatch: pytest.MonkeyPatch, terminal: bool) -> Iterator[Requests]:
    """stop_on_signals in this process, as if it had a controlling terminal or not."""
    monkeypatch.setattr(_hangup, "has_controlling_terminal", lambda: terminal)
    requests = Requests()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with stop_on_signals(requests.stop, requests.force, lambda: 5.0, wake_w):
            yield requests
    finally:
        signal.signal(signal.SIGHUP, previous)
        os.close(wake_r)
        os.close(wake_w)


def test_in_a_terminal_sighup_stops_once_and_a_later_sigterm_forces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with stopping_on_signals(monkeypatch, terminal=True) as requests:
        # The main thread runs a Python handler before the next bytecode:
        # each kill below has been handled once it returns.
        os.kill(os.getpid(), signal.SIGHUP)
        assert requests.asked == ["stop"]
        os.kill(os.getpid(), signal.SIGHUP)  # A closing terminal's second one.
        assert requests.asked == ["stop"]
        os.kill(os.getpid(), signal.SIGTERM)
        assert requests.asked == ["stop", "force"]
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # Put back at the end.


def test_sighup_is_left_alone_without_a_terminal_or_with_a_handler_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with stopping_on_signals(monkeypatch, terminal=False):
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    monkeypatch.setattr(_hangup, "has_controlling_terminal", lambda: True)
    assert _hangup.sighup_stops()
    assert not _hangup.sighup_reloads()

    def own(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGHUP, own)
    try:
        assert not _hangup.sighup_stops()  # The application's handler stays.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        assert not _hangup.sighup_stops()
        assert not _hangup.sighup_reloads()
    finally:
        signal.signal(signal.SIGHUP, previous)
    monkeypatch.setattr(_hangup, "has_controlling_terminal", lambda: False)
    assert _hangup.sighup_reloads()


@pytest.mark.parametrize("how", ["terminal-closes", "kill-HUP"])
@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "supervisor"])
def test_sighup_in_a_terminal_stops_gracefully_and_a_second_one_does_not_force(
    tmp_path: Path, workers: list[str], how: str
) -> None:
    (tmp_path / "gated_echo.py").write_text(GATED_ECHO_MODULE)
    hold = tmp_path / "hold"
    hold.write_text("")  # The handler returns only once this is gone.
    with contextlib.ExitStack() as cleanup:
        terminal = PseudoTerminal()
        cleanup.callback(terminal.hang_up)
        threadserve = [sys.executable, "-m", "threadserve"]
        command = [sys.executable, "-c", ON_TERMINAL, terminal.name, *threadserve]
        args = ["gated_echo:handle", *workers, "--bind", "127.0.0.1:0", "--grace", "60"]
        server = ServerProcess(args, command=command, cwd=tmp_path)
        cleanup.callback(end_process_group, server)
        # Runs first: a worker left behind (its own session) then ends at once.
        cleanup.callback(hold.unlink, missing_ok=True)
        # One process says "serving on ADDR"; a supervisor "2 workers ready, serving on ADDR".
        address = server.wait_serving(timeout=60)
        with socket.create_connection(address, timeout=10) as client:
            client.sendall(b"before\n")
            assert recv_exactly(client, 7) == b"before\n"
            if how == "terminal-closes":
                terminal.hang_up()  # The kernel sends the server SIGHUP.
            else:
                server.send_signal(signal.SIGHUP)
            server.wait_for_log(r"SIGHUP received.*stopping.*gracefully", timeout=60)
            # The handler holds the stop open; a second SIGHUP (a shell passing
            # the hang-up on) comes now, and must not force it.
            server.send_signal(signal.SIGHUP)
            server.wait_for_log(r"SIGHUP ignored: stopping already", timeout=60)
            hold.unlink()
            assert recv_exactly(client, len(NOTICE)) == NOTICE
            assert recv_until_eof(client) == b""
        assert server.wait_exit(60) == 0, server.output()  # 3 would mean forced.
        output = server.output()
    assert "forcing" not in output, output
    assert not re.search(r"reloading|new workers", output), output
    assert "Traceback" not in output, output


def sighup_bits(pid: int) -> tuple[bool, bool]:
    """Whether ``pid`` ignores SIGHUP, and whether it has a handler for it (/proc/PID/status)."""
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    bit = 1 << (signal.SIGHUP - 1)
    return bool(int(fields["SigIgn"], 16) & bit), bool(int(fields["SigCgt"], 16) & bit)


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "supervisor"])
def test_under_nohup_sighup_stays_ignored(workers: list[str]) -> None:
    command = ["nohup", sys.executable, "-m", "threadserve"]
    with ServerProcess([*workers, "--bind", "127.0.0.1:0"], command=command) as server:
        address = server.wait_serving(timeout=60)
        # Still ignored while serving: no handler of ours took it over.
        assert sighup_bits(server.process.pid) == (True, False)
        with socket.create_connection(address, timeout=10) as client:
            client.sendall(b"one\n")
            assert recv_exactly(client, 4) == b"one\n"
            server.send_signal(signal.SIGHUP)  # Discarded by the kernel as it is sent.
            client.sendall(b"two\n")
            assert recv_exactly(client, 4) == b"two\n"
            server.send_signal(signal.SIGTERM)
            assert recv_exactly(client, len(NOTICE)) == NOTICE
        assert server.wait_exit(60) == 0, server.output()
        output = server.output()
    assert not re.search(r"SIGHUP|reloading|new workers", output), output
