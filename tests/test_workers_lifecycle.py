"""Workers: binding, counting, recycling and forcing, as the supervisor's table promises."""

from __future__ import annotations

import os
import re
import signal
import socket

import psutil
import pytest
from subprocess_handlers import READ_ACK
from support import SETTLE, ServerProcess, recv_exactly
from test_workers import READY_LINE, Load, start_supervisor, wait_for, workers_of

from threadserve import ConfigurationError
from threadserve._checks import MAX_WORKERS
from threadserve._supervisor import Supervisor

pytestmark = pytest.mark.timeout(120)


def test_the_supervisor_binds_every_address_or_none() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess(
            ["--bind", "127.0.0.1:0", "--bind", f"127.0.0.1:{port}", "--workers", "2"]
        )
        with server:
            code = server.wait_exit(SETTLE)
            output = server.output()
    assert code == 1, output
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in output, output
    assert "worker" not in output.replace("--workers", ""), output


def test_workers_auto_starts_one_per_cpu_this_process_may_use() -> None:
    server, _address = start_supervisor("--workers", "auto")
    with server:
        wanted = len(os.sched_getaffinity(0))
        match = re.search(READY_LINE, server.output(), re.M)
        assert match is not None
        assert int(match.group(1)) == wanted
        assert len(workers_of(server)) == wanted
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(SETTLE) == 0, server.output()


def test_recycling_at_max_worker_connections_loses_no_client() -> None:
    server, address = start_supervisor("--workers", "1", "--max-worker-connections", "40")
    with server:
        first = workers_of(server)
        load = Load(address)
        recycled = r"worker (\d+) reached its connection limit: replacing it"
        try:
            wait_for(
                lambda: len(re.findall(r"worker \d+ stopped: exited with 0", server.output())) >= 2,
                60,
                "two recycled workers to stop",
            )
            before = load.served()
            wait_for(lambda: load.served() >= before + 50, SETTLE, "traffic after them")
        finally:
            outcomes = load.finish()
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(SETTLE) == 0, server.output()
        output = server.output()
    print(f"\n--max-worker-connections 40, 16 clients, 2+ recycles: {dict(outcomes)}")
    assert outcomes["refused"] == 0, outcomes
    assert outcomes["reset"] == 0, outcomes
    assert outcomes["told"] == 0, outcomes
    assert outcomes["error"] == 0, (outcomes, load.errors[:5])
    old = [int(pid) for pid in re.findall(recycled, output)]
    assert old[0] in first
    # Each one's replacement was ready before it stopped (the first two: a
    # third may have been under way at the final stop).
    for pid in old[:2]:
        asked = output.index(f"worker {pid} reached its connection limit")
        started = re.compile(r"worker (\d+) started").search(output, asked)
        assert started is not None, output
        new = started.group(1)
        assert output.index(f"worker {new} ready") < output.index(f"worker {pid} stopped"), output


def test_a_second_sigterm_forces_every_worker_and_exits_3() -> None:
    server, address = start_supervisor(
        "subprocess_handlers:stuck_on_request", "--workers", "2", "--grace", "60"
    )
    with server:
        workers = workers_of(server)
        clients = []
        try:
            for _ in range(6):
                sock = socket.create_connection(address, timeout=SETTLE)
                sock.sendall(b"STUCK\n")
                assert recv_exactly(sock, 1) == READ_ACK
                clients.append(sock)
            server.send_signal(signal.SIGTERM)
            wait_for(
                lambda: len(re.findall(r"stopping: \d+ connections?,", server.output())) == 2,
                SETTLE,
                "both workers to begin their stop",
            )
            sent_at = server.send_signal(signal.SIGTERM)
            assert server.wait_exit(SETTLE) == 3, server.output()
            took = server.exited_at - sent_at
        finally:
            for sock in clients:
                sock.close()
        output = server.output()
    print(f"\nsecond SIGTERM to exit 3 (grace 60 s, 6 stuck handlers): {took:.2f} s")
    assert "SIGTERM received again: forcing every worker" in output, output
    assert "sleep_ignoring_the_token" in output, output  # The stuck threads' stacks.
    assert not [pid for pid in workers if psutil.pid_exists(pid)], "workers left behind"
    assert took < 30, took  # Not the 60 s grace period.


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"workers": 0}, "workers=0"),
        ({"workers": MAX_WORKERS + 1}, f"workers={MAX_WORKERS + 1}"),
        # Through the API as through the command line: a NaN or infinite
        # drain never ended, a NaN worker timeout crashed the supervisor's
        # wait, and 0 killed every worker before it could be ready.
        ({"drain_delay": float("inf")}, "drain_delay=inf"),
        ({"drain_delay": float("nan")}, "drain_delay=nan"),
        ({"worker_timeout": float("nan")}, "worker_timeout=nan"),
        ({"worker_timeout": 0}, "worker_timeout=0"),
        ({"grace": -1}, "grace=-1"),
    ],
)
def test_a_supervisor_refuses_bad_settings_before_starting_anything(
    settings: dict[str, float], message: str
) -> None:
    arguments = {"workers": 1, **settings}
    with pytest.raises(ConfigurationError, match=message):
        Supervisor(["true"], [], **arguments)  # type: ignore[arg-type]


def test_sigttin_adds_no_worker_past_the_most(caplog: pytest.LogCaptureFixture) -> None:
    # A supervisor that has not started: at the most already, SIGTTIN's
    # adjustment returns before it would fork (which would fail here: no listeners).
    supervisor = Supervisor(["true"], [], workers=MAX_WORKERS)
    with caplog.at_level("INFO", logger="threadserve"):
        supervisor._adjust(+1)
    assert supervisor.wanted == MAX_WORKERS
    assert supervisor.workers == []
    assert f"SIGTTIN ignored: {MAX_WORKERS} workers is the most" in caplog.text
