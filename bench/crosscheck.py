"""Cross-check one cell with a load generator nobody in this project wrote.

    python -m bench.crosscheck [--repeats 3] [--duration 4]

The cell: echo of 1 KiB messages over 100 connections, against threadserve
and asyncio-protocol, each warmed by a throwaway run first. Each warm server
is measured twice: by bench/loadgen.c, and by wrk (Debian package `wrk`), a
well-known closed-loop HTTP load generator (one request in flight per
connection, like ours).

wrk only speaks HTTP, and an echo server answers a request with itself, so
the request wrk sends is written as an HTTP *response* of exactly 1,024 bytes
(a status line, a Content-Length header and a body): the echo comes back as
a well-formed response that wrk parses and counts. wrk checks the framing of
every reply (status line, length, body size), not every byte as ours does.
Its first call of `request()` only serves wrk's own start-up check, which
wants a valid request and sends nothing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.build import build_all
from bench.client import run_echo
from bench.peerlist import PEERS
from bench.server import ServerProcess, free_port, pin_prefix

PEER_NAMES = ("threadserve", "asyncio-protocol")
CONNS, SIZE = 100, 1024

# Lua for wrk: every request is a 1,024-byte HTTP response, which the echo
# server returns as it is.
WRK_SCRIPT = """
local size = %(size)d
local head = "HTTP/1.1 200 OK\\r\\nContent-Length: "
local n = size - #head - 4
n = size - #head - #tostring(n) - 4
local raw = head .. n .. "\\r\\n\\r\\n" .. string.rep("a", n)
assert(#raw == size)
local calls = 0
function request()
  calls = calls + 1
  if calls == 1 then
    return "GET / HTTP/1.1\\r\\nHost: echo\\r\\n\\r\\n"
  end
  return raw
end
"""


class CrossCheckError(RuntimeError):
    """wrk is missing, failed, or printed something unexpected."""


def wrk_available() -> str | None:
    """None when wrk can run, else why not."""
    if shutil.which("wrk") is None:
        return "wrk is not installed (apt-get install wrk; `make bench` installs it)"
    return None


def _unit_seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise CrossCheckError(f"unexpected wrk latency {text!r}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[match.group(2)]
    return float(match.group(1)) * scale


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, p50/p99 and error counts from wrk's text report."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rate is None:
        raise CrossCheckError("wrk printed no Requests/sec:\n" + output[-1000:])
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.MULTILINE))
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "throughput_rps": float(rate.group(1)),
        "p50_us": _unit_seconds(percentiles["50"]) * 1e6 if "50" in percentiles else None,
        "p99_us": _unit_seconds(percentiles["99"]) * 1e6 if "99" in percentiles else None,
        "errors": sum(int(v) for v in errors.groups()) if errors else 0,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
    }


def run_wrk(port: int, duration: float, cpu: int | None, script: Path) -> dict[str, Any]:
    argv = [
        *pin_prefix(cpu), "wrk", "-t1", f"-c{CONNS}", f"-d{max(int(duration), 1)}s",
        "--latency", "-s", str(script), f"http://127.0.0.1:{port}/",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise CrossCheckError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def crosscheck(
    repeats: int,
    duration: float,
    throwaway: float,
    server_cpu: int | None,
    client_cpu: int | None,
) -> dict[str, Any]:
    """Per repeat and peer: a fresh server, a throwaway run, then ours and wrk's."""
    loadgen = build_all()["loadgen"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "echo.lua"
        script.write_text(WRK_SCRIPT % {"size": SIZE})
        for repeat in range(repeats):
            for name in PEER_NAMES:
                port = free_port()
                with ServerProcess(PEERS[name].command(port, "echo"), port, server_cpu) as server:
                    server.wait_listening(timeout=30)

                    def ours(seconds: float, pid: int = server.pid, p: int = port) -> Any:
                        return run_echo(
                            loadgen, port=p, conns=CONNS, size=SIZE, warmup=0.5,
                            duration=seconds, connect_timeout=30, server_pid=pid, cpu=client_cpu,
                        )  # fmt: skip

                    ours(throwaway)
                    # Alternate which generator goes first, so a drift within a
                    # server's life does not always favour the same one.
                    order = ("loadgen", "wrk") if repeat % 2 == 0 else ("wrk", "loadgen")
                    row: dict[str, Any] = {"peer": name, "repeat": repeat}
                    for which in order:
                        if which == "wrk":
                            row["wrk"] = run_wrk(port, duration, client_cpu, script)
                        else:
                            client = ours(duration)
                            row["loadgen"] = {
                                "throughput_rps": client["throughput_rps"],
                                "p50_us": client["latency_us"]["p50"],
                                "p99_us": client["latency_us"]["p99"],
                                "errors": sum(client["errors"].values()),
                            }
                    server.check_alive()
                rows.append(row)
    return {"conns": CONNS, "size": SIZE, "duration": duration, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.crosscheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--throwaway", type=float, default=2.0, help="warm-up run, seconds")
    parser.add_argument("--server-cpu", type=int, default=0, help="-1: do not pin")
    parser.add_argument("--client-cpu", type=int, default=1, help="-1: do not pin")
    args = parser.parse_args(argv)
    reason = wrk_available()
    if reason:
        print(f"bench.crosscheck: {reason}", file=sys.stderr)
        return 1
    pin = [None if cpu < 0 else cpu for cpu in (args.server_cpu, args.client_cpu)]
    result = crosscheck(args.repeats, args.duration, args.throwaway, pin[0], pin[1])
    for row in result["rows"]:
        print(
            f"r{row['repeat'] + 1} {row['peer']}: loadgen {row['loadgen']['throughput_rps']:.0f}"
            f" req/s, wrk {row['wrk']['throughput_rps']:.0f} req/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
