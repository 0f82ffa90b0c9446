"""Drive the compiled load generator (bench/loadgen.c) and read its JSON.

`run_echo` is one timed closed-loop run. `Session` holds connections open
(idle, or active under load) until the harness says `stop` or `quit`, for the
idle-memory and stop-time workloads.

Every wait here has a deadline: a load generator that stops answering is
killed, never waited on forever.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.server import pin_prefix

JsonDict = dict[str, Any]

#: Handshakes the load generator keeps in flight while connecting (its
#: --inflight): a connection counts against it until its first echo is back.
#: A server that answers nobody therefore shows exactly this many connected.
CONNECT_WINDOW = 128


class ClientError(RuntimeError):
    """The load generator failed, timed out, or printed something unexpected."""


def run_echo(
    binary: Path,
    *,
    port: int,
    conns: int,
    size: int,
    warmup: float,
    duration: float,
    connect_timeout: float,
    server_pid: int,
    cpu: int | None,
    short: int = 0,
    short_size: int = 64,
) -> JsonDict:
    """One closed-loop run: `conns` busy connections and `short` clients
    opening short connections, `warmup` then `duration` seconds."""
    argv = [
        *pin_prefix(cpu),
        str(binary),
        "--mode", "echo",
        "--port", str(port),
        "--conns", str(conns),
        "--size", str(size),
        "--warmup", str(warmup),
        "--duration", str(duration),
        "--connect-timeout", str(connect_timeout),
        "--inflight", str(CONNECT_WINDOW),
        "--server-pid", str(server_pid),
        "--short", str(short),
        "--short-size", str(short_size),
        # At least three slices, so a steadiness check has something to compare.
        "--slice", str(min(1.0, duration / 3)),
    ]  # fmt: skip
    # Its own bounds end it well before this; the margin covers closing
    # 10,000 sockets on a loaded machine.
    limit = connect_timeout + warmup + duration + 60
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=limit
        )
    except subprocess.TimeoutExpired as exc:
        raise ClientError(f"load generator did not finish within {limit:g} s") from exc
    if done.returncode != 0:
        raise ClientError(f"load generator exited {done.returncode}: {done.stderr.strip()}")
    return _last_json(done.stdout)


def _last_json(text: str) -> JsonDict:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ClientError("load generator printed nothing")
    result: JsonDict = json.loads(lines[-1])
    return result


class Session:
    """A load generator in `hold` or `active` mode, commanded over stdin."""

    def __init__(
        self,
        binary: Path,
        *,
        mode: str,
        port: int,
        conns: int,
        size: int,
        connect_timeout: float,
        observe_timeout: float,
        server_pid: int,
        cpu: int | None,
        warmup: float = 0.5,
    ) -> None:
        self.argv = [
            *pin_prefix(cpu),
            str(binary),
            "--mode", mode,
            "--port", str(port),
            "--conns", str(conns),
            "--size", str(size),
            "--warmup", str(warmup),
            "--connect-timeout", str(connect_timeout),
            "--inflight", str(CONNECT_WINDOW),
            "--observe-timeout", str(observe_timeout),
            "--hold-timeout", "600",
            "--server-pid", str(server_pid),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    def __enter__(self) -> Session:
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def _readline(self, timeout: float) -> JsonDict:
        assert self.proc is not None
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientError(f"load generator silent for {timeout:g} s")
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise ClientError("load generator exited early: " + self._stderr())
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        parsed: JsonDict = json.loads(line)
        return parsed

    def _stderr(self) -> str:
        assert self.proc is not None
        assert self.proc.stderr is not None
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace").strip()

    def _send(self, command: str) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_ready(self, timeout: float) -> JsonDict:
        """Block until every connection is up (hold: and had its round trip)."""
        event = self._readline(timeout)
        if event.get("event") != "ready":
            raise ClientError(f"expected the ready event, got {event}")
        return event

    def stop(self, timeout: float = 10) -> None:
        """Switch the generator to watching how connections end."""
        self._send("stop")
        event = self._readline(timeout)
        if event.get("event") != "stopping":
            raise ClientError(f"expected the stopping event, got {event}")

    def finish(self, timeout: float, quit_first: bool) -> JsonDict:
        """Collect the final result (after `quit`, or after a stop's observation)."""
        if quit_first:
            self._send("quit")
        result = self._readline(timeout)
        assert self.proc is not None
        self.proc.wait(timeout=timeout)
        return result
