"""Run one peer as a pinned subprocess, watch it, and stop it.

Resource handling: every ServerProcess is a context manager; leaving it kills
the process (by its own pid) if it is still alive, so an exception in a run
never leaves a server behind.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

from bench.build import BENCH_DIR

REPO_ROOT = BENCH_DIR.parent

# Interpreter settings that change a peer's speed and that a developer's or
# CI's shell may carry: PYTHONUNBUFFERED, for one, turns the seed server's
# print into a write system call per message. Servers run without them.
SCRUBBED_ENV = (
    "PYTHONUNBUFFERED",
    "PYTHONDEVMODE",
    "PYTHONASYNCIODEBUG",
    "PYTHONTRACEMALLOC",
    "PYTHONMALLOC",
    "PYTHONFAULTHANDLER",
    "PYTHONWARNINGS",
    # threadserve's own switch to its pure-Python read (bench.cost_per_request
    # sets it on purpose for one of its rows).
    "THREADSERVE_PURE_PYTHON",
)


def server_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in SCRUBBED_ENV}


class ServerError(RuntimeError):
    """The server did not start, or died when it should not have."""


@dataclass(frozen=True)
class Memory:
    rss_kib: int
    pte_kib: int
    threads: int


@dataclass(frozen=True)
class Settle:
    seconds: float  # until the server held no client connection, or the timeout
    held: int  # client connections it still held at the end (0: settled)
    threads: int  # its thread count at the end


class ServerStuck(ServerError):
    """The server did not let go of a finished run's clients in time."""


@dataclass(frozen=True)
class Exit:
    seconds: float  # signal to exit; the timeout if it had to be killed
    returncode: int | None
    killed: bool  # did not exit by itself within the timeout


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then wait up to ``timeout`` seconds; a process still there is killed."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    """A port the kernel just considered free on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def process_cpu_times(pid: int, include_children: bool = False) -> tuple[float, float]:
    """(user, system) CPU seconds process ``pid`` has used so far, all its threads.

    With ``include_children``, those of its live descendants are added (a
    supervisor and its workers). A descendant that ends between being listed
    and being read is left out; so is a reaped one, whose CPU the kernel
    moves to its parent's children's times, which are not counted here.
    """
    root = psutil.Process(pid)
    if not include_children:
        times = root.cpu_times()
        return float(times.user), float(times.system)
    user = system = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        user += times.user
        system += times.system
    return user, system


def process_cpu_seconds(pid: int, include_children: bool = False) -> float:
    """User + system CPU seconds so far: the sum of ``process_cpu_times``."""
    return sum(process_cpu_times(pid, include_children))


def pin_prefix(cpu: int | None) -> list[str]:
    """`taskset -c CPU`, or nothing where pinning is off or impossible."""
    if cpu is None or cpu not in os.sched_getaffinity(0):
        return []
    return ["taskset", "-c", str(cpu)]


class ServerProcess:
    def __init__(
        self, argv: list[str], port: int, cpu: int | None, env: dict[str, str] | None = None
    ) -> None:
        self.argv = argv
        self.port = port
        self.cpu = cpu
        self.extra_env = env or {}  # on top of server_env(), for experiments
        # Closed in __exit__: the file outlives this method by design.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        # stdout goes nowhere (the seed server prints every message); stderr
        # is kept to explain a failure. A new session keeps a Ctrl-C in the
        # terminal from reaching the server before the harness cleans up.
        self.proc = subprocess.Popen(
            [*pin_prefix(self.cpu), *self.argv],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
            env={**server_env(), **self.extra_env},
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        self._stderr.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "use ServerProcess as a context manager"
        return self.proc.pid

    def stderr_tail(self, limit: int = 2000) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")
        return text[-limit:]

    def wait_listening(self, timeout: float) -> None:
        """Wait until the process has a listening socket on our port.

        Looked up in the process's own sockets rather than by connecting, so
        no probe connection disturbs the idle-memory baseline.
        """
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        process = psutil.Process(self.pid)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"server exited with {self.proc.returncode} before listening:\n"
                    + self.stderr_tail()
                )
            try:
                for conn in process.net_connections(kind="tcp"):
                    if (
                        conn.status == psutil.CONN_LISTEN
                        and conn.laddr
                        and conn.laddr.port == self.port
                    ):
                        return
            except psutil.Error:
                pass  # the process may be between fork and exec
            time.sleep(0.02)
        raise ServerError(f"server not listening on port {self.port} after {timeout:g} s")

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ServerError(f"server died with {self.proc.returncode}:\n" + self.stderr_tail())

    def held_connections(self) -> int:
        """TCP connections the server still holds, its listening sockets aside.

        Read from the process's own descriptors, so a connection counts until
        the server has closed it, whatever state the kernel shows for it.
        """
        try:
            found = psutil.Process(self.pid).net_connections(kind="tcp")
        except psutil.Error:
            return 0  # gone: check_alive() tells why
        return sum(1 for conn in found if conn.status != psutil.CONN_LISTEN)

    def wait_settled(self, timeout: float) -> Settle:
        """Wait until the server has closed every client connection of the last run.

        A load generator's exit closes all its connections at once; a
        thread-per-connection server then has thousands of threads ending
        together, which takes it seconds. A run started before that is over
        measures the end of the previous one (and its accept loop waits for
        the GIL behind all of them). Polled, with a deadline: a server that
        never lets go is reported, not waited on.
        """
        start = time.monotonic()
        deadline = start + timeout
        while True:
            held = self.held_connections()
            now = time.monotonic()
            if not held or now >= deadline:
                return Settle(now - start, held, self.memory().threads)
            time.sleep(0.1)

    def memory(self) -> Memory:
        """RSS, page tables and thread count from /proc/PID/status."""
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmPTE", "Threads"):
                fields[key] = int(value.split()[0])
        return Memory(fields.get("VmRSS", 0), fields.get("VmPTE", 0), fields.get("Threads", 0))

    def minor_faults(self) -> int:
        """Minor page faults so far (all threads), from /proc/PID/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        # After the command name (which may hold spaces): state is field 3,
        # minflt field 10.
        return int(stat.rsplit(")", 1)[1].split()[7])

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds so far, all threads."""
        return process_cpu_times(self.pid)

    def cpu_seconds(self) -> float:
        return sum(self.cpu_times())

    def terminate_and_time(self, timeout: float) -> Exit:
        """Send SIGTERM and time the exit to the millisecond.

        A pidfd becomes readable the moment the process exits; Popen.wait()
        with a timeout polls with sleeps of up to 50 ms, too coarse here.
        """
        assert self.proc is not None
        pidfd = os.pidfd_open(self.pid)
        try:
            start = time.monotonic()
            os.kill(self.pid, signal.SIGTERM)
            ready, _, _ = select.select([pidfd], [], [], timeout)
            elapsed = time.monotonic() - start
        finally:
            os.close(pidfd)
        if ready:
            return Exit(elapsed, self.proc.wait(), killed=False)
        self.kill()
        return Exit(timeout, self.proc.returncode, killed=True)

    def kill(self) -> None:
        """SIGKILL the server if it still runs, and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        # Past 30 s it is stuck in the kernel; nothing more can be done here.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
