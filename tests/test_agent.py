"""The HAProxy agent-check responder (_agent.py) on its own."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import SETTLE, recv_until_eof

from threadserve import BindError
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
