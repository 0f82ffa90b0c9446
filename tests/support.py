"""Shared test helpers: loopback clients and bounded waits (never bare sleeps)."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import threadserve
from threadserve import Connection, Server, StopReport
from threadserve._broadcast import MAX_GROUPS

T = TypeVar("T")

NOTICE = b"Shutting down!\n"


def connect(address: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes: {bytes(data)!r}")
        data += chunk
    return bytes(data)


def recv_until_eof(sock: socket.socket) -> bytes:
    """Everything until a clean EOF; a reset raises, which is what tests check."""
    data = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk


#: How long a test waits for a state it expects (a counter, a log line, a
#: thread count) before it fails. A wait ends as soon as the state is there,
#: so a generous bound costs a passing run nothing; it only has to outlast a
#: machine whose cores are taken by other work, where what takes milliseconds
#: when idle can take seconds. A state that never comes still fails the test.
SETTLE = 30.0


def wait_until(
    condition: Callable[[], bool],
    timeout: float = SETTLE,
    what: str = "",
    state: Callable[[], object] | None = None,
) -> None:
    """Wait for a condition on server counters, bounded in time.

    ``state``, if given, is called on a timeout and its value shown in the
    failure, so a failure says what was seen instead of what was awaited.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not condition():
        if time.monotonic() > deadline:
            seen = f"; saw {state()}" if state is not None else ""
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what or condition}{seen}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def wait_for_value(produce: Callable[[], T | None], what: str, timeout: float = SETTLE) -> T:
    """Call ``produce`` until it returns something other than None, bounded in time; return that."""
    found: list[T] = []

    def produced() -> bool:
        value = produce()
        if value is not None:
            found.append(value)
        return bool(found)

    wait_until(produced, timeout=timeout, what=what)
    return found[0]


def connection_threads() -> list[str]:
    """The names of live connection threads (server threads aside) in this process."""
    return [
        thread.name
        for thread in threading.enumerate()
        if thread.name.startswith("threadserve")
        and not thread.name.startswith("threadserve server")
    ]


def descriptors() -> Counter[str]:
    """This process's open descriptors, counted by kind: socket, eventfd, pipe, file, ...

    Leak checks compare kinds rather than one total, because a server may
    keep a few descriptors by design after a burst: it opens one stop-group
    eventfd per 256 connections alive at its peak and keeps it (see
    ``threadserve._broadcast``), and how high that peak goes on a busy machine
    depends on how fast connection threads get to finish. Sockets, pipes and
    files have no such allowance: each one must come back.
    """
    kinds: Counter[str] = Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue  # Closed since the listing (the listing's own descriptor, for one).
        if target.startswith("anon_inode:"):
            kind = target.removeprefix("anon_inode:").strip("[]")
        elif target.startswith(("socket:", "pipe:")):
            kind = target.partition(":")[0]
        else:
            kind = "file"
        kinds[kind] += 1
    return kinds


def descriptors_back(baseline: Counter[str]) -> bool:
    """Every descriptor opened since ``baseline`` is closed again, stop-group eventfds aside."""
    grown = descriptors() - baseline
    return grown["eventfd"] <= MAX_GROUPS and not grown - Counter(eventfd=grown["eventfd"])


# ---------------------------------------------------------------- a server in a subprocess

TESTS_DIR = Path(__file__).resolve().parent
SERVING_LINE = re.compile(r"serving on 127\.0\.0\.1:(\d+)$", re.MULTILINE)


def subprocess_env(*, with_tests_dir: bool = True) -> dict[str, str]:
    """The environment for a server subprocess: the threadserve under test, plus our handlers."""
    # The same threadserve as this process imports, installed or not.
    paths = [str(Path(threadserve.__file__).resolve().parent.parent)]
    if with_tests_dir:
        paths.append(str(TESTS_DIR))  # For `subprocess_handlers:NAME` handler specs.
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


# A handler module to write into a test's folder (served with cwd there) as
# gated_echo.py, for tests that need a server process held at a known point:
# while the file "hold-import" exists its import waits (a new process that is
# slow to start), and while "hold" exists a handler whose connection has ended
# does not return (a stop under way). Each wait is bounded at 60 s.
GATED_ECHO_MODULE = '''\
"""An echo handler held by two files: "hold-import" at import, "hold" after its connection."""

import os
import time

deadline = time.monotonic() + 60
while os.path.exists("hold-import") and time.monotonic() < deadline:
    time.sleep(0.05)


def handle(conn):
    for chunk in conn:
        conn.sendall(chunk)
    deadline = time.monotonic() + 60
    while os.path.exists("hold") and time.monotonic() < deadline:
        time.sleep(0.01)
'''


class ServerProcess:
    """``threadserve serve ARGS`` in a subprocess, its output going to a temporary file.

    A file rather than a pipe, so a chatty server (a log line per connection)
    never blocks on a pipe the test is not reading at that moment. A reaper
    thread notes when the process exits, so a stop time is measured from the
    signal to the exit, not to whenever the test gets round to waiting.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        command: Sequence[str] | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = [*(command or [sys.executable, "-m", "threadserve"]), "serve", *args]
        self._log_fd, log_name = tempfile.mkstemp(prefix="threadserve-", suffix=".log")
        os.unlink(log_name)  # Only the descriptor is needed; nothing to clean up on disk.
        self._output = bytearray()
        self.exited = threading.Event()
        self.exited_at = 0.0
        try:
            self.process = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=self._log_fd,
                stderr=self._log_fd,
                cwd=cwd,
                env=env if env is not None else subprocess_env(),
                # Its own session: a Ctrl-C meant for the test run is not a test signal.
                start_new_session=True,
            )
        except BaseException:
            os.close(self._log_fd)
            raise
        self._reaper = threading.Thread(target=self._reap, name="server process reaper")
        self._reaper.start()

    def _reap(self) -> None:
        self.process.wait()
        self.exited_at = time.monotonic()
        self.exited.set()

    def output(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        # pread: the child shares this descriptor's file offset, which moving
        # it here would make the child overwrite its own output.
        while chunk := os.pread(self._log_fd, 1 << 20, len(self._output)):
            self._output += chunk
        return self._output.decode(errors="replace")

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float = SETTLE
    ) -> re.Match[str]:
        """Wait until complete output lines match ``pattern``; fail at once if the server exits."""
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            exited = self.exited.is_set()  # Checked first: all it wrote before exiting counts.
            output = self.output()
            match = regex.search(output[: output.rfind("\n") + 1])
            if match:
                return match
            if exited:
                raise AssertionError(
                    f"server exited with {self.process.returncode} before logging "
                    f"{regex.pattern!r}:\n{output}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {regex.pattern!r} in server output after {timeout} s:\n{output}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def wait_serving(self, timeout: float = SETTLE) -> tuple[str, int]:
        """Wait for the "serving on" line; return the address it reports (port 0 resolved)."""
        return ("127.0.0.1", int(self.wait_for_log(SERVING_LINE, timeout).group(1)))

    def send_signal(self, signum: int) -> float:
        """Send ``signum``; return when it was sent (``time.monotonic()``)."""
        sent_at = time.monotonic()
        self.process.send_signal(signum)
        return sent_at

    def wait_exit(self, timeout: float = SETTLE) -> int:
        """Wait for the exit, bounded; return the exit code."""
        if not self.exited.wait(timeout):
            raise AssertionError(f"server still running after {timeout} s:\n{self.output()}")
        assert self.process.returncode is not None
        return self.process.returncode

    def close(self) -> None:
        """Kill the server if it still runs and release everything; safe to call twice."""
        if not self.exited.is_set():
            self.process.kill()
        self._reaper.join(10)
        self.process.wait(10)  # Already reaped, so at once; Popen would warn otherwise.
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def server_process(
    *args: str, command: Sequence[str] | None = None, cwd: Path | None = None
) -> Iterator[tuple[ServerProcess, tuple[str, int]]]:
    """Run ``threadserve serve ARGS``, wait until it listens; killed on the way out if need be."""
    with ServerProcess(args, command=command, cwd=cwd) as server:
        yield server, server.wait_serving()


def recv_many(
    socks: Sequence[socket.socket], *, sizes: Sequence[int] | None = None, timeout: float = SETTLE
) -> list[bytes]:
    """Read many sockets at once: each until ``sizes[i]`` bytes, or until EOF without ``sizes``.

    One selector serves them all, so lingering closes on the server side do
    not serialise. A socket that reaches EOF is closed at once: a server
    doing a lingering close waits for exactly that. A reset raises
    ``ConnectionResetError`` naming the client; an early EOF raises ``EOFError``.
    """
    results = [bytearray() for _ in socks]
    timeouts = [sock.gettimeout() for sock in socks]
    selector = selectors.DefaultSelector()
    try:
        for index, sock in enumerate(socks):
            if sizes is None or sizes[index] > 0:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, index)
        deadline = time.monotonic() + timeout
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pending = sorted(key.data for key in selector.get_map().values())
                raise AssertionError(f"timed out after {timeout} s reading clients {pending[:20]}")
            for key, _events in selector.select(remaining):
                index = key.data
                sock = socks[index]
                wanted = 65536 if sizes is None else sizes[index] - len(results[index])
                try:
                    chunk = sock.recv(wanted)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionResetError as exc:
                    raise ConnectionResetError(
                        exc.errno, f"client {index} reset after {bytes(results[index])!r}"
                    ) from exc
                if not chunk:
                    selector.unregister(sock)
                    sock.close()
                    if sizes is not None:
                        raise EOFError(f"client {index}: EOF after {bytes(results[index])!r}")
                    continue
                results[index] += chunk
                if sizes is not None and len(results[index]) == sizes[index]:
                    selector.unregister(sock)
        return [bytes(result) for result in results]
    finally:
        selector.close()
        for sock, sock_timeout in zip(socks, timeouts, strict=True):
            if sock.fileno() != -1:
                sock.settimeout(sock_timeout)


class Probe(Generic[T]):
    """A handler that runs ``body`` and hands its outcome to the test thread.

    Exceptions are recorded, then re-raised so the server treats them exactly
    as it would for a real handler (notices, logging, statistics).
    """

    def __init__(self, body: Callable[[Connection], T]) -> None:
        self._body = body
        self._outcomes: queue.Queue[tuple[bool, T | BaseException]] = queue.Queue()

    def __call__(self, conn: Connection) -> None:
        try:
            value = self._body(conn)
        except BaseException as exc:
            self._outcomes.put((False, exc))
            raise
        self._outcomes.put((True, value))

    def result(self, timeout: float = SETTLE) -> T:
        returned, value = self._outcomes.get(timeout=timeout)
        if not returned:
            assert isinstance(value, BaseException)
            raise AssertionError(f"handler raised {value!r}") from value
        return value  # type: ignore[return-value]

    def exception(self, timeout: float = SETTLE) -> BaseException:
        returned, value = self._outcomes.get(timeout=timeout)
        assert not returned, f"handler returned {value!r} instead of raising"
        assert isinstance(value, BaseException)
        return value


class StopInBackground:
    """``server.stop()`` in another thread, so the test can keep acting as the client."""

    def __init__(self, server: Server) -> None:
        self.report: StopReport | None = None
        self._thread = threading.Thread(target=self._stop, args=(server,))
        self._thread.start()

    def _stop(self, server: Server) -> None:
        self.report = server.stop()

    def join(self) -> StopReport:
        self._thread.join(30)
        assert self.report is not None
        return self.report


_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago and not handed out before in this run.

    The kernel may give the same port 0 twice in a row once the probe closes;
    a test that needs two ports (a server and its agent, two instances behind
    HAProxy) must get two different ones.
    """
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port
