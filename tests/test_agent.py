"""The HAProxy agent-check responder (_agent.py): on its own, and answered by a supervisor."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    NOTICE,
    SETTLE,
    ServerProcess,
    free_port,
    recv_until_eof,
    subprocess_env,
    wait_until,
)

from threadserve import BindError, _agent
from threadserve._agent import AgentResponder


@pytest.fixture
def agent() -> Iterator[AgentResponder]:
    responder = AgentResponder("127.0.0.1:0")
    responder.start()
    try:
        yield responder
    finally:
        responder.close()


def ask(address: str) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=SETTLE) as sock:
        return recv_until_eof(sock)


def test_answers_up_ready_then_drain_then_up_again(agent: AgentResponder) -> None:
    address = agent.addresses[0]
    assert ask(address) == b"up ready\n"
    agent.drain()
    assert agent.draining
    assert ask(address) == b"drain\n"
    assert ask(address) == b"drain\n"
    agent.ready()
    assert ask(address) == b"up ready\n"
    assert agent.answered == 4


def test_many_checks_at_once(agent: AgentResponder) -> None:
    answers: list[bytes] = []
    lock = threading.Lock()

    def one() -> None:
        answer = ask(agent.addresses[0])
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SETTLE)
    assert answers == [b"up ready\n"] * 20


def test_close_ends_the_thread_and_refuses_checks() -> None:
    responder = AgentResponder("127.0.0.1:0")
    responder.start()
    address = responder.addresses[0]
    assert ask(address) == b"up ready\n"
    responder.close()
    assert not any(t.name.startswith("threadserve agent") for t in threading.enumerate())
    with pytest.raises(ConnectionRefusedError):
        ask(address)


def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    responder = AgentResponder(f"unix:{path}")
    responder.start()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(SETTLE)
            sock.connect(str(path))
            assert recv_until_eof(sock) == b"up ready\n"
    finally:
        responder.close()
    assert not path.exists()


def test_busy_address_fails_at_once(agent: AgentResponder) -> None:
    with pytest.raises(BindError):
        AgentResponder(agent.addresses[0])


# ------------------------------------------- what the checker sends (HAProxy's agent-send)


def connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=SETTLE)


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        data += chunk
    return data


def assert_no_reset(sock: socket.socket) -> None:
    """The responder closed this check cleanly: no reset reached the checker.

    Once the responder has seen the checker's EOF and closed, a reset it had
    sent would have been taken by the checker's socket on loopback already;
    SO_ERROR holds it (ECONNRESET, or EPIPE once our FIN was in).
    """
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def test_a_string_sent_after_the_answer_is_read_and_the_close_is_clean(
    agent: AgentResponder,
) -> None:
    """The agent-send string reaches us after we answered: dropped, then a clean close.

    Reading the answer first guarantees the responder's first read has
    passed: the string arrives while the check lingers. Closing then would
    have answered the string with a reset.
    """
    with connect(agent.addresses[0]) as sock:
        assert read_line(sock) == b"up ready\n"
        sock.sendall(b"ready-check\n")
        assert recv_until_eof(sock) == b""
        sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: agent.closed_clean == 1, what="the check to end at its EOF")
        assert_no_reset(sock)
    assert (agent.answered, agent.closed_early, agent.lingering) == (1, 0, 0)


def test_a_string_sent_before_the_answer_is_dropped(agent: AgentResponder) -> None:
    """HAProxy sends agent-send right after connecting, before it reads anything."""
    for n in range(20):
        with connect(agent.addresses[0]) as sock:
            sock.sendall(b"agent-send string %d\n" % n)
            assert recv_until_eof(sock) == b"up ready\n"
            sock.shutdown(socket.SHUT_WR)
            # Answered (it read our EOF): it ends once the responder saw its EOF.
            wait_until(
                lambda: agent.closed_clean + agent.closed_early == agent.answered,
                what="the check to end",
            )
            assert_no_reset(sock)
    assert (agent.answered, agent.closed_clean, agent.closed_early) == (20, 20, 0)


def test_a_checker_that_resets_ends_its_check(agent: AgentResponder) -> None:
    """HAProxy may end a check with a reset of its own (no TIME_WAIT): that is an end too."""
    sock = connect(agent.addresses[0])
    assert read_line(sock) == b"up ready\n"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    wait_until(lambda: agent.closed_clean == 1, what="the check to end at the reset")
    assert agent.lingering == 0


def test_a_checker_that_sends_too_much_is_cut_off(agent: AgentResponder) -> None:
    with connect(agent.addresses[0]) as sock:
        assert read_line(sock) == b"up ready\n"
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for _ in range(4):
                sock.sendall(b"x" * _agent.DISCARD_LIMIT)
        wait_until(lambda: agent.closed_early == 1, what="the check to be cut off")
    assert (agent.closed_clean, agent.lingering) == (0, 0)


def test_a_checker_that_never_closes_is_closed_after_the_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_agent, "LINGER", 0.2)
    responder = AgentResponder("127.0.0.1:0")
    responder.start()
    try:
        with connect(responder.addresses[0]) as sock:
            assert read_line(sock) == b"up ready\n"
            wait_until(lambda: responder.closed_early == 1, what="the linger to run out")
            assert responder.lingering == 0
            # Answered and closed after its FIN: the checker still reads a clean end.
            assert sock.recv(100) == b""
    finally:
        responder.close()


def test_lingering_checks_are_bounded_and_closed_with_the_responder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_agent, "MAX_LINGERING", 3)
    responder = AgentResponder("127.0.0.1:0")
    responder.start()
    socks = []
    try:
        for _ in range(5):
            sock = connect(responder.addresses[0])
            socks.append(sock)
            assert read_line(sock) == b"up ready\n"
        # The fifth answer is counted before its check joins the lingering
        # ones (and the oldest is closed for it): wait for both.
        wait_until(
            lambda: (responder.answered, responder.lingering, responder.closed_early) == (5, 3, 2),
            what="five answers, three lingering, two closed early",
        )
        for sock in socks[2:]:
            sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: responder.closed_clean == 3, what="the three to end")
        assert responder.lingering == 0
        # One lingering at close: closed with the responder, its thread gone.
        socks.append(connect(responder.addresses[0]))
        assert read_line(socks[-1]) == b"up ready\n"
        wait_until(lambda: responder.lingering == 1, what="a check lingering")
    finally:
        responder.close()
        for sock in socks:
            sock.close()
    assert not any(t.name.startswith("threadserve agent") for t in threading.enumerate())
    assert responder.closed_early == 3


# ------------------------------------------------- one process: a real signal starts the drain


#: Long enough for the checks below on a busy machine; every run waits it out.
ONE_PROCESS_DRAIN = 3.0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_one_process_drains_on_a_signal_then_stops(signum: signal.Signals) -> None:
    """``--drain-delay``: the agent says drain, new clients are still served, then the stop."""
    agent = f"127.0.0.1:{free_port()}"
    args = ["echo", "--bind", "127.0.0.1:0", "--agent-bind", agent]
    args += ["--drain-delay", str(ONE_PROCESS_DRAIN)]
    with ServerProcess(args) as server:
        _host, port = server.wait_serving()
        assert ask(agent) == b"up ready\n"
        sent = server.send_signal(signum)
        server.wait_for_log(r"draining for 3\.0 s before stopping")
        assert ask(agent) == b"drain\n"
        # Still accepting and serving, as the drain promises.
        assert echo_exchange(port, b"during the drain\n") == "served"
        assert ask(agent) == b"drain\n"
        assert server.wait_exit() == 0, server.output()
        # The delay was waited out before the usual stop.
        assert server.exited_at - sent >= ONE_PROCESS_DRAIN
    with pytest.raises(ConnectionRefusedError):
        ask(agent)


# ---------------------------------------------------- with --workers: the supervisor answers

WORKERS_READY = r"(\d+) workers ready, serving on 127\.0\.0\.1:(\d+)$"
AGENT_LINE = r"agent-check answered on (127\.0\.0\.1:\d+) \(by the supervisor\)"


def echo_exchange(port: int, line: bytes) -> str:
    """One client: connect, send a line, read it back; its outcome in one word."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=SETTLE) as sock:
            sock.sendall(line)
            data = b""
            while len(data) < len(line):
                chunk = sock.recv(len(line) - len(data))
                if not chunk:
                    break
                data += chunk
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    if data == line:
        return "served"
    return "told" if data.startswith(NOTICE[: len(data)]) else f"other {data!r}"


def start_workers(*args: str) -> tuple[ServerProcess, int, str]:
    server = ServerProcess(["echo", "--bind", "127.0.0.1:0", "--workers", "2", *args])
    try:
        agent = server.wait_for_log(AGENT_LINE).group(1)
        port = int(server.wait_for_log(WORKERS_READY).group(2))
    except BaseException:
        server.close()
        raise
    return server, port, agent


def test_workers_without_a_drain_delay_the_agent_says_up_ready_through_a_reload() -> None:
    server, _port, agent = start_workers("--agent-bind", "127.0.0.1:0")
    with server:
        assert ask(agent) == b"up ready\n"
        workers_before = set(re.findall(r"worker (\d+) ready", server.output()))
        # A reload hands the shared queue to the new workers with no gap:
        # the instance stays in rotation.
        server.send_signal(signal.SIGHUP)
        answers = set()
        deadline = time.monotonic() + SETTLE
        while "reloaded:" not in server.output() and time.monotonic() < deadline:
            answers.add(ask(agent))  # Bounded: the reload's few seconds, at most SETTLE.
            assert not server.exited.is_set(), server.output()
        server.wait_for_log(r"reloaded: 2 new workers ready")
        answers.add(ask(agent))
        assert answers == {b"up ready\n"}
        assert set(re.findall(r"worker (\d+) ready", server.output())) > workers_before
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.output()


def test_workers_a_reload_with_a_drain_delay_drains_until_the_new_workers_serve() -> None:
    server, port, agent = start_workers("--agent-bind", "127.0.0.1:0", "--drain-delay", "1.5")
    with server:
        assert ask(agent) == b"up ready\n"
        sent = time.monotonic()
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r"the agent says drain for at least 1\.5 s")
        assert ask(agent) == b"drain\n"
        # The old workers serve on while the load balancer is told to drain.
        outcomes = Counter(echo_exchange(port, b"during the drain %d\n" % n) for n in range(20))
        assert outcomes == Counter(served=20), outcomes
        server.wait_for_log(r"reloaded: 2 new workers ready")
        # Not before the delay, even if the new workers were ready sooner.
        reloaded_at = time.monotonic()
        assert reloaded_at - sent >= 1.5
        assert ask(agent) == b"up ready\n"
        assert echo_exchange(port, b"after\n") == "served"
        server.send_signal(signal.SIGTERM)
        server.wait_for_log(r"SIGTERM received: draining for 1\.5 s")
        assert ask(agent) == b"drain\n"
        assert server.wait_exit() == 0, server.output()


def test_workers_drain_on_a_stop_and_a_second_signal_forces() -> None:
    server, port, agent = start_workers("--agent-bind", "127.0.0.1:0", "--drain-delay", "60")
    with server:
        assert ask(agent) == b"up ready\n"
        server.send_signal(signal.SIGTERM)
        server.wait_for_log(r"SIGTERM received: draining for 60\.0 s")
        assert ask(agent) == b"drain\n"
        # The workers go on serving during the drain: every client served.
        outcomes = Counter(echo_exchange(port, b"during the drain %d\n" % n) for n in range(40))
        assert outcomes == Counter(served=40), outcomes
        assert ask(agent) == b"drain\n"
        assert "stopping gracefully" not in server.output()  # Still draining.
        # A second signal ends the drain and forces the stop.
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 3, server.output()
        assert "ending the drain, forcing every worker" in server.output()
    with pytest.raises(ConnectionRefusedError):
        ask(agent)


def test_workers_drain_delay_then_the_usual_stop() -> None:
    server, port, _agent = start_workers("--agent-bind", "127.0.0.1:0", "--drain-delay", "0.5")
    with server:
        assert echo_exchange(port, b"before\n") == "served"
        sent = server.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.output()
        # Not before the delay: the drain is waited out, then the workers stop.
        assert server.exited_at - sent >= 0.5
        output = server.output()
        assert output.index("draining for 0.5 s") < output.index("drain delay over")
        assert len(re.findall(r"worker \d+ stopped: exited with 0", output)) == 2


@contextlib.contextmanager
def busy_address() -> Iterator[str]:
    responder = AgentResponder("127.0.0.1:0")
    try:
        yield responder.addresses[0]
    finally:
        responder.close()


def test_workers_the_agent_address_in_use_fails_at_once() -> None:
    with busy_address() as busy:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "threadserve",
                "serve",
                "--bind",
                "127.0.0.1:0",
                "--workers",
                "2",
                "--agent-bind",
                busy,
            ],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=SETTLE,
        )
    assert result.returncode == 1, result.stderr
    assert busy in result.stderr
    assert "worker" not in result.stderr  # No worker was started.
