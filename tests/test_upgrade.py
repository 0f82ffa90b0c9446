"""Upgrading in place (SIGUSR2), and one process's reload (SIGHUP): real processes and signals.

The supervisor runs under upgrade_reaper.py, a child subreaper, so that a
successor left behind by an old supervisor that exited is still a child of
the test's tree: its exit status can be seen, and the reaper exiting means
no process of the tree is left.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import ServerFactory
from support import (
    GATED_ECHO_MODULE,
    NOTICE,
    TESTS_DIR,
    ServerProcess,
    recv_exactly,
    subprocess_env,
)
from test_workers import READY_LINE, Load, wait_for

from threadserve._exceptions import ConfigurationError
from threadserve._pidfile import read_pid_file
from threadserve._systemd import Notifier
from threadserve._upgrade import HANDOVER_VARIABLE, Handover, ServerUpgrade, take_handover
from threadserve.handlers import echo

pytestmark = pytest.mark.timeout(120)

REAPER = str(TESTS_DIR / "upgrade_reaper.py")
UPGRADES = 2

ECHO_MODULE = '''\
"""An echo handler that a test later breaks."""


def handle(conn):
    for chunk in conn:
        conn.sendall(chunk)
'''
BROKEN_MODULE = 'raise RuntimeError("this handler broke between start and upgrade")\n'


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def workers_of(pid: int) -> set[int]:
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return set()
    return {child.pid for child in children if alive(child.pid)}


def tree(root: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Supervised:
    """``threadserve serve ARGS --workers 2 --pid-file F`` under the reaper."""

    def __init__(
        self, folder: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.pid_file = str(folder / "threadserve.pid")
        self.process = ServerProcess(
            [*args, "--bind", "127.0.0.1:0", "--workers", "2", "--pid-file", self.pid_file],
            command=[sys.executable, REAPER, sys.executable, "-m", "threadserve"],
            env=env,
            cwd=cwd,
        )
        self.seen: set[int] = set()
        try:
            match = self.process.wait_for_log(READY_LINE, timeout=60)
            self.address = ("127.0.0.1", int(match.group(2)))
            wait_for(lambda: self.pid() is not None, 30, "the pid file")
        except BaseException:
            self.close()
            raise

    def pid(self) -> int | None:
        pid = read_pid_file(self.pid_file)
        if pid is not None:
            self.seen.add(pid)
            self.seen |= workers_of(pid)
        return pid

    def supervisor(self) -> int:
        pid = self.pid()
        assert pid is not None, self.process.output()
        return pid

    def output(self) -> str:
        return self.process.output()

    def close(self) -> None:
        # Whatever a failed test left running below the reaper goes first.
        for pid in tree(self.process.process.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        self.process.close()


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="threadserve-upgrade-") as name:
        yield Path(name)


class NotifyListener:
    """A datagram socket standing in for systemd's, noting each message's sender pid."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.received: list[tuple[int, dict[str, str]]] = []

    def drain(self) -> list[tuple[int, dict[str, str]]]:
        credentials_size = array.array("i", [0, 0, 0]).itemsize * 3
        while True:
            try:
                data, ancillary, _flags, _address = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(credentials_size)
                )
            except BlockingIOError:
                return self.received
            sender = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = array.array("i", payload[:credentials_size])[0]  # pid, uid, gid
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.received.append((sender, fields))

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("mode", ["shared", "reuse-port"])
def test_two_upgrades_under_load_lose_no_client_and_hand_everything_over(
    mode: str, folder: Path
) -> None:
    notify = NotifyListener(str(folder / "notify"))
    env = {**subprocess_env(), "NOTIFY_SOCKET": str(folder / "notify")}
    server = Supervised(folder, *(["--reuse-port"] if mode == "reuse-port" else []), env=env)
    try:
        supervisors = [server.supervisor()]
        generations = [workers_of(supervisors[0])]
        assert len(generations[0]) == 2
        load = Load(server.address)
        times = []
        try:
            for _ in range(UPGRADES):
                before = load.served()
                wait_for(lambda b=before: load.served() >= b + 50, 30, "traffic before an upgrade")
                old = supervisors[-1]
                old_workers = workers_of(old)
                sent_at = time.monotonic()
                os.kill(old, signal.SIGUSR2)
                gone_at = wait_for(lambda o=old: not alive(o), 60, "the old supervisor to exit")
                times.append(gone_at - sent_at)
                new = server.supervisor()
                assert new != old
                supervisors.append(new)
                assert not any(alive(pid) for pid in old_workers), "old workers left behind"
                wait_for(lambda n=new: len(workers_of(n)) == 2, 30, "the new workers")
                generations.append(workers_of(new))
                server.process.wait_for_log(rf"^reaped {old} 0$")
            before = load.served()
            wait_for(lambda: load.served() >= before + 50, 30, "traffic after the upgrades")
        finally:
            outcomes = load.finish()
        seen = set(server.seen)
        last = supervisors[-1]
        os.kill(last, signal.SIGTERM)
        assert server.process.wait_exit(30) == 0, server.output()
        output = server.output()
        messages = notify.drain()
    finally:
        server.close()
        notify.close()
    print(
        f"\n{mode}: {UPGRADES} upgrades under load (16 clients): {dict(outcomes)}; "
        f"SIGUSR2 to the old supervisor gone: {', '.join(f'{t:.2f}' for t in times)} s"
    )
    assert outcomes["refused"] == 0, outcomes
    assert outcomes["reset"] == 0, outcomes
    # Shared: one kernel queue, served by whichever workers are up. Reuse-port:
    # an old worker handing over drops new SYNs (retried onto the others) and
    # serves what its own queue holds. Nobody is told either way.
    assert outcomes["told"] == 0, outcomes
    assert outcomes["error"] == 0, (outcomes, load.errors[:5])
    assert outcomes["served"] > 200, outcomes
    # A new supervisor and two new workers each time, the old ones gone.
    assert len(set(supervisors)) == UPGRADES + 1, supervisors
    for index, workers in enumerate(generations):
        assert len(workers) == 2
        assert not workers & set().union(*generations[:index]), generations
    for pid in supervisors:
        assert re.search(rf"^reaped {pid} 0$", output, re.M), output
    # Every new worker was ready before any old one was stopped.
    pairs = itertools.pairwise(generations)
    for (old_workers, new_workers), new in zip(pairs, supervisors[1:], strict=True):
        handover = output.index(f"supervisor {new} is ready: handing over")
        for pid in new_workers:
            assert output.index(f"worker {pid} ready") < handover, output
        for pid in old_workers:
            assert output.index(f"worker {pid} stopped: exited with 0") > handover, output
    assert not [pid for pid in seen if alive(pid)], "processes left behind"
    assert not os.path.exists(server.pid_file)
    assert "Traceback" not in output, output
    # systemd heard READY=1 from the first supervisor, then from each old
    # one MAINPID= naming its successor, then STOPPING=1 from the last one.
    handovers = [(sender, f) for sender, f in messages if "MAINPID" in f]
    assert [(sender, int(f["MAINPID"]), f["READY"]) for sender, f in handovers] == [
        (old, new, "1") for old, new in itertools.pairwise(supervisors)
    ], messages
    assert messages[0][0] == supervisors[0], messages
    assert messages[0][1].get("READY") == "1", messages
    stopping = [sender for sender, f in messages if f.get("STOPPING") == "1"]
    assert stopping == [last], messages
    # Nothing from a successor before it took over, nor from an old one after.
    for old, new in itertools.pairwise(supervisors):
        handover = next(i for i, (s, f) in enumerate(messages) if f.get("MAINPID") == str(new))
        assert all(s != new for s, _f in messages[:handover]), messages
        assert all(s != old for s, _f in messages[handover + 1 :]), messages


def test_upgrade_whose_new_supervisor_cannot_start_leaves_the_old_one_serving(
    folder: Path,
) -> None:
    module = folder / "upgrade_echo.py"
    module.write_text(ECHO_MODULE)
    server = Supervised(folder, "upgrade_echo:handle", cwd=folder)
    try:
        supervisor = server.supervisor()
        workers = workers_of(supervisor)
        with socket.create_connection(server.address, timeout=10) as held:
            held.sendall(b"before\n")
            assert recv_exactly(held, 7) == b"before\n"
            # SIGUSR2 to every process, as `systemctl kill -s USR2` sends it:
            # the workers take no notice.
            for pid in workers:
                os.kill(pid, signal.SIGUSR2)
            # New code on disk that no longer imports: the new supervisor's
            # workers fail, and with them the upgrade.
            module.write_text(BROKEN_MODULE)
            os.kill(supervisor, signal.SIGUSR2)
            match = server.process.wait_for_log(
                r"upgrade failed: new supervisor (\d+): (.*); supervisor (\d+) goes on serving$",
                timeout=60,
            )
            successor = int(match.group(1))
            wait_for(lambda: not alive(successor), 30, "the failed supervisor to exit")
            assert int(match.group(3)) == supervisor
            assert "this handler broke between start and upgrade" in match.group(2)
            # Nothing changed for the clients: the same supervisor, the same workers.
            assert server.supervisor() == supervisor
            assert workers_of(supervisor) == workers
            held.sendall(b"after\n")
            assert recv_exactly(held, 6) == b"after\n"
            for i in range(10):
                with socket.create_connection(server.address, timeout=10) as fresh:
                    fresh.sendall(f"fresh {i}\n".encode())
                    assert recv_exactly(fresh, 8) == f"fresh {i}\n".encode()
            os.kill(supervisor, signal.SIGTERM)
            assert recv_exactly(held, len(NOTICE)) == NOTICE
        assert server.process.wait_exit(30) == 0, server.output()
        output = server.output()
    finally:
        server.close()
    assert "threadserve: error: cannot load handler 'upgrade_echo:handle'" in output, output
    assert not [pid for pid in server.seen | workers if alive(pid)], "processes left behind"


def test_stop_during_an_upgrade_stops_both_supervisors(folder: Path) -> None:
    server = Supervised(folder)
    try:
        supervisor = server.supervisor()
        with socket.create_connection(server.address, timeout=10) as held:
            held.sendall(b"hello\n")
            assert recv_exactly(held, 6) == b"hello\n"
            os.kill(supervisor, signal.SIGUSR2)
            match = server.process.wait_for_log(r"upgrading: new supervisor (\d+) started")
            successor = int(match.group(1))
            os.kill(supervisor, signal.SIGTERM)
            assert recv_exactly(held, len(NOTICE)) == NOTICE
            # The reaper exits once no process of the tree is left.
            assert server.process.wait_exit(30) == 0, server.output()
        output = server.output()
    finally:
        server.close()
    assert re.search(rf"^reaped {supervisor} 0$", output, re.M), output
    assert re.search(rf"new supervisor {successor} stopped: ", output), output
    assert "handing over" not in output, output
    assert not os.path.exists(server.pid_file)


def test_pid_file_without_workers_names_the_server_and_goes_at_exit(folder: Path) -> None:
    pid_file = folder / "one.pid"
    with ServerProcess(["--bind", "127.0.0.1:0", "--pid-file", str(pid_file)]) as server:
        server.wait_serving()
        assert read_pid_file(str(pid_file)) == server.process.pid
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(30) == 0, server.output()
    assert not pid_file.exists()


def test_handover_variable_is_taken_by_the_old_supervisors_child_only() -> None:
    handover = Handover(os.getppid(), 7, 3, ((5, True), (6, False)))
    assert Handover.decode(handover.encode()) == handover
    env = {HANDOVER_VARIABLE: handover.encode()}
    assert take_handover(env) == handover
    assert env == {}
    # Inherited further down (a handler's subprocess, say): not ours, and cleared.
    other = {HANDOVER_VARIABLE: Handover(1, 7, 3, ((5, True),)).encode()}
    assert take_handover(other) is None
    assert other == {}
    with pytest.raises(ConfigurationError, match="malformed THREADSERVE_HANDOVER"):
        take_handover({HANDOVER_VARIABLE: "nonsense"})


# ---------------------------------------------------------------- one process (no --workers)


class OneProcess:
    """``threadserve serve ARGS --pid-file F`` (one process) under the reaper."""

    def __init__(
        self, folder: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.pid_file = str(folder / "one.pid")
        self.process = ServerProcess(
            [*args, "--bind", "127.0.0.1:0", "--pid-file", self.pid_file],
            command=[sys.executable, REAPER, sys.executable, "-m", "threadserve"],
            env=env,
            cwd=cwd,
        )
        try:
            match = self.process.wait_for_log(r"serving on 127\.0\.0\.1:(\d+)$", timeout=60)
            self.address = ("127.0.0.1", int(match.group(1)))
            wait_for(lambda: read_pid_file(self.pid_file) is not None, 30, "the pid file")
        except BaseException:
            self.close()
            raise

    def pid(self) -> int:
        pid = read_pid_file(self.pid_file)
        assert pid is not None, self.process.output()
        return pid

    def close(self) -> None:
        for pid in tree(self.process.process.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        self.process.close()


def test_one_process_upgrades_in_place_under_load_losing_no_client(folder: Path) -> None:
    notify = NotifyListener(str(folder / "notify"))
    env = {**subprocess_env(), "NOTIFY_SOCKET": str(folder / "notify")}
    server = OneProcess(folder, env=env)
    try:
        pids = [server.pid()]
        load = Load(server.address)
        times = []
        try:
            for _ in range(UPGRADES):
                before = load.served()
                wait_for(lambda b=before: load.served() >= b + 50, 30, "traffic before an upgrade")
                old = pids[-1]
                sent_at = time.monotonic()
                os.kill(old, signal.SIGUSR2)
                gone_at = wait_for(lambda o=old: not alive(o), 60, "the old process to exit")
                times.append(gone_at - sent_at)
                new = server.pid()
                assert new != old, server.process.output()
                pids.append(new)
                server.process.wait_for_log(rf"^reaped {old} 0$")
            before = load.served()
            wait_for(lambda: load.served() >= before + 50, 30, "traffic after the upgrades")
        finally:
            outcomes = load.finish()
        os.kill(pids[-1], signal.SIGTERM)
        assert server.process.wait_exit(30) == 0, server.process.output()
        output = server.process.output()
        messages = notify.drain()
    finally:
        server.close()
        notify.close()
    print(
        f"\none process: {UPGRADES} upgrades under load (16 clients): {dict(outcomes)}; "
        f"SIGUSR2 to the old process gone: {', '.join(f'{t:.2f}' for t in times)} s"
    )
    assert outcomes["refused"] == 0, outcomes
    assert outcomes["reset"] == 0, outcomes
    # One kernel queue, the same socket in both processes: nobody is told.
    assert outcomes["told"] == 0, outcomes
    assert outcomes["error"] == 0, (outcomes, load.errors[:5])
    assert outcomes["served"] > 100, outcomes
    assert len(set(pids)) == UPGRADES + 1, pids
    for pid in pids:
        assert re.search(rf"^reaped {pid} 0$", output, re.M), output
    # Each new process served before its predecessor began to stop.
    for old, new in itertools.pairwise(pids):
        handing = output.index(f"process {new} is serving: handing over to it")
        assert output.index(f"process {old} exits: process {new} serves on") > handing
    assert not os.path.exists(server.pid_file)
    assert "Traceback" not in output, output
    # systemd: MAINPID= naming the successor, from the old process; STOPPING=1
    # from the last one only (an old one stopping is no longer systemd's news).
    handovers = [(sender, int(f["MAINPID"])) for sender, f in messages if "MAINPID" in f]
    assert handovers == list(itertools.pairwise(pids)), messages
    stopping = [sender for sender, f in messages if f.get("STOPPING") == "1"]
    assert stopping == [pids[-1]], messages


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGHUP], ids=["SIGUSR2", "SIGHUP"])
def test_one_process_upgrade_or_reload_that_cannot_start_leaves_it_serving(
    folder: Path, signum: int
) -> None:
    module = folder / "upgrade_echo.py"
    module.write_text(ECHO_MODULE)
    notify = NotifyListener(str(folder / "notify"))
    env = {**subprocess_env(), "NOTIFY_SOCKET": str(folder / "notify")}
    server = OneProcess(folder, "upgrade_echo:handle", env=env, cwd=folder)
    what = "reload" if signum == signal.SIGHUP else "upgrade"
    try:
        pid = server.pid()
        with socket.create_connection(server.address, timeout=10) as held:
            held.sendall(b"before\n")
            assert recv_exactly(held, 7) == b"before\n"
            module.write_text(BROKEN_MODULE)
            os.kill(pid, signum)
            match = server.process.wait_for_log(
                rf"{what} failed: new server process (\d+): (.*); process (\d+) goes on serving$",
                timeout=60,
            )
            assert int(match.group(3)) == pid
            assert "this handler broke between start and upgrade" in match.group(2)
            assert server.pid() == pid
            held.sendall(b"after\n")
            assert recv_exactly(held, 6) == b"after\n"
            for i in range(5):
                with socket.create_connection(server.address, timeout=10) as fresh:
                    fresh.sendall(f"fresh {i}\n".encode())
                    assert recv_exactly(fresh, 8) == f"fresh {i}\n".encode()
            os.kill(pid, signal.SIGTERM)
            assert recv_exactly(held, len(NOTICE)) == NOTICE
        assert server.process.wait_exit(30) == 0, server.process.output()
        messages = [fields for sender, fields in notify.drain() if sender == pid]
    finally:
        server.close()
        notify.close()
    # systemd: a reload (RELOADING=1) is closed by READY=1 even when it fails;
    # an upgrade says nothing of the kind.
    reloading = [i for i, f in enumerate(messages) if f.get("RELOADING") == "1"]
    ready_after = [i for i, f in enumerate(messages) if f.get("READY") == "1"]
    if signum == signal.SIGHUP:
        assert len(reloading) == 1, messages
        assert any(i > reloading[0] for i in ready_after), messages
        assert "reload failed, serving" in messages[ready_after[-1]].get("STATUS", ""), messages
    else:
        assert reloading == [], messages


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGHUP], ids=["SIGUSR2", "SIGHUP"])
def test_one_process_with_an_agent_logs_and_ignores_upgrade_and_reload(
    folder: Path, signum: int
) -> None:
    server = OneProcess(folder, "--agent-bind", "127.0.0.1:0")
    try:
        pid = server.pid()
        os.kill(pid, signum)
        name = signal.Signals(signum).name
        server.process.wait_for_log(rf"{name} ignored: with --agent-bind or --metrics")
        with socket.create_connection(server.address, timeout=10) as fresh:
            fresh.sendall(b"still\n")
            assert recv_exactly(fresh, 6) == b"still\n"
        assert server.pid() == pid
        os.kill(pid, signal.SIGTERM)
        assert server.process.wait_exit(30) == 0, server.process.output()
    finally:
        server.close()


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGHUP], ids=["SIGUSR2", "SIGHUP"])
def test_one_process_ignores_upgrade_and_reload_once_stopping(folder: Path, signum: int) -> None:
    (folder / "gated_echo.py").write_text(GATED_ECHO_MODULE)
    (folder / "hold").write_text("")  # The handler returns only once this is gone.
    server = OneProcess(folder, "gated_echo:handle", "--grace", "60", cwd=folder)
    try:
        pid = server.pid()
        with socket.create_connection(server.address, timeout=10) as held:
            held.sendall(b"hi\n")
            assert recv_exactly(held, 3) == b"hi\n"
            os.kill(pid, signal.SIGTERM)
            # The handler holds the stop open while the signal comes.
            server.process.wait_for_log(r"stopping: 1 connection")
            os.kill(pid, signum)
            name = signal.Signals(signum).name
            server.process.wait_for_log(rf"{name} ignored: stopping")
            (folder / "hold").unlink()
            assert recv_exactly(held, len(NOTICE)) == NOTICE
        assert server.process.wait_exit(30) == 0, server.process.output()
        output = server.process.output()
    finally:
        server.close()
    assert "new server process" not in output, output
    # The reaper saw one process only: no successor was started.
    assert re.findall(r"^reaped (\d+) ", output, re.M) == [str(pid)], output


VERSIONED_MODULE = '''\
"""An echo handler that says which version of this file it was imported from."""

VERSION = %r


def handle(conn):
    for chunk in conn:
        conn.sendall(VERSION + b" " + chunk)
'''


def test_one_process_reloads_on_sighup_importing_the_handler_afresh(folder: Path) -> None:
    """SIGHUP without --workers: a new process with the handler as it is now takes over."""
    (folder / "versioned_echo.py").write_text(VERSIONED_MODULE % b"first")
    notify = NotifyListener(str(folder / "notify"))
    env = {**subprocess_env(), "NOTIFY_SOCKET": str(folder / "notify")}
    server = OneProcess(folder, "versioned_echo:handle", env=env, cwd=folder)
    try:
        old = server.pid()
        with socket.create_connection(server.address, timeout=10) as held:
            held.sendall(b"a\n")
            assert recv_exactly(held, 8) == b"first a\n"
            # A different length too, so no stale bytecode of the first can pass for it.
            (folder / "versioned_echo.py").write_text(VERSIONED_MODULE % b"second")
            os.kill(old, signal.SIGHUP)
            match = server.process.wait_for_log(
                r"SIGHUP received: reloading: new server process (\d+) started", timeout=60
            )
            new = int(match.group(1))
            server.process.wait_for_log(rf"process {old} exits: process {new} serves on", 60)
            # The old process's own client: served until the hand-over, then told.
            assert recv_exactly(held, len(NOTICE)) == NOTICE
        assert server.pid() == new
        with socket.create_connection(server.address, timeout=10) as fresh:
            fresh.sendall(b"b\n")
            assert recv_exactly(fresh, 9) == b"second b\n"
        os.kill(new, signal.SIGTERM)
        assert server.process.wait_exit(30) == 0, server.process.output()
        output = server.process.output()
        messages = notify.drain()
    finally:
        server.close()
        notify.close()
    assert re.search(rf"^reaped {old} 0$", output, re.M), output
    assert re.search(rf"^reaped {new} 0$", output, re.M), output
    # systemd's notify-reload protocol: RELOADING=1 with the time, from the
    # old process; then READY=1 with MAINPID= naming the new one, from it too.
    from_old = [fields for sender, fields in messages if sender == old]
    reloading = [f for f in from_old if f.get("RELOADING") == "1"]
    assert len(reloading) == 1, messages
    assert "MONOTONIC_USEC" in reloading[0], messages
    assert from_old.index(reloading[0]) < next(
        i for i, f in enumerate(from_old) if f.get("MAINPID") == str(new) and f.get("READY") == "1"
    ), messages


def test_stop_during_a_one_process_upgrade_stops_the_new_process_too(folder: Path) -> None:
    (folder / "gated_echo.py").write_text(GATED_ECHO_MODULE)
    server = OneProcess(folder, "gated_echo:handle", cwd=folder)
    try:
        pid = server.pid()
        with socket.create_connection(server.address, timeout=10) as held:
            held.sendall(b"hello\n")
            assert recv_exactly(held, 6) == b"hello\n"
            (folder / "hold-import").write_text("")  # The new process hangs in its import.
            os.kill(pid, signal.SIGUSR2)
            match = server.process.wait_for_log(r"upgrading: new server process (\d+) started")
            successor = int(match.group(1))
            os.kill(pid, signal.SIGTERM)
            assert recv_exactly(held, len(NOTICE)) == NOTICE
            assert server.process.wait_exit(60) == 0, server.process.output()
        output = server.process.output()
    finally:
        server.close()
    assert re.search(rf"^reaped {pid} 0$", output, re.M), output
    assert f"stopping the new server process {successor} too" in output, output
    # Waited for by the old process itself, so not left for the reaper.
    assert not alive(successor)
    assert "handing over" not in output, output


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGHUP], ids=["SIGUSR2", "SIGHUP"])
def test_a_new_process_ready_only_once_the_old_one_is_stopping_is_stopped_not_handed_over(
    folder: Path, signum: int
) -> None:
    (folder / "gated_echo.py").write_text(GATED_ECHO_MODULE)
    server = OneProcess(folder, "gated_echo:handle", "--grace", "60", cwd=folder)
    try:
        pid = server.pid()
        with socket.create_connection(server.address, timeout=10) as held:
            held.sendall(b"hi\n")
            assert recv_exactly(held, 3) == b"hi\n"
            (folder / "hold").write_text("")
            (folder / "hold-import").write_text("")
            os.kill(pid, signum)
            match = server.process.wait_for_log(r"new server process (\d+) started")
            successor = int(match.group(1))
            os.kill(pid, signal.SIGTERM)
            server.process.wait_for_log(r"stopping: 1 connection")
            (folder / "hold-import").unlink()  # The new process serves, and says so.
            server.process.wait_for_log(
                rf"abandoned: this server is stopping; stopping the new server process {successor}",
                timeout=60,
            )
            (folder / "hold").unlink()
            assert recv_exactly(held, len(NOTICE)) == NOTICE
        # The reaper ends only once no process of the tree is left.
        assert server.process.wait_exit(60) == 0, server.process.output()
        output = server.process.output()
    finally:
        server.close()
    assert "handing over" not in output, output
    assert re.search(rf"^reaped {pid} 0$", output, re.M), output
    # Stopped and waited for by the old process itself, so not left for the reaper.
    assert not alive(successor)


@pytest.mark.parametrize("stop_first", [False, True], ids=["hand-over-first", "stop-first"])
def test_listeners_are_handed_over_only_while_no_stop_has_begun(
    serve: ServerFactory, folder: Path, stop_first: bool
) -> None:
    """Server.hand_over_listeners: the stop then leaves the queue and the socket file alone.

    A Unix socket shows it from outside: the stop removes the file of a socket
    it still owns, and leaves a handed-over one to the successor.
    """
    path = folder / "upgrade.sock"
    server = serve(echo, bind=f"unix:{path}")
    if stop_first:
        server.stop()
        assert not server.hand_over_listeners()
        assert not path.exists()
    else:
        assert server.hand_over_listeners()
        server.stop()
        assert path.exists()


class _NeverStopping:
    """The Serving side of a ServerUpgrade whose successor never gets ready."""

    grace = 1.0
    stopping = False

    def hand_over_listeners(self) -> bool:
        raise AssertionError("nothing was to be handed over")

    def pause_accepting(self) -> None:
        raise AssertionError("nothing was to be handed over")

    def stop(self, grace: float | None = None) -> object:
        raise AssertionError("nothing was to be stopped")


def test_signals_that_come_together_start_one_new_process_and_each_other_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A SIGUSR2 and a SIGHUP read in one go: the first acts, the second says it was ignored."""
    caplog.set_level(logging.INFO, logger="threadserve")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]  # Never says it is ready.
    upgrade = ServerUpgrade(
        _NeverStopping(), [], sleeper, subprocess_env(), notifier=Notifier({}), timeout=60
    )
    try:
        # As both arrive when the handler runs twice before the upgrade
        # thread reads: their numbers in the pipe together.
        os.write(upgrade._wake_w, bytes([signal.SIGUSR2, signal.SIGHUP]))
        wait_for(lambda: "SIGHUP ignored" in caplog.text, 30, "the second signal's log line")
        successor = upgrade.successor
        assert successor is not None
    finally:
        upgrade.close()
    assert f"SIGUSR2 received: upgrading: new server process {successor.pid} started" in (
        caplog.text
    )
    assert f"SIGHUP ignored: upgrading to process {successor.pid} already" in caplog.text
    assert caplog.text.count(" started") == 1, caplog.text
    assert successor.process.poll() is not None  # close() ended it.
