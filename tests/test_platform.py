"""The portable fallbacks, run here on Linux: pipe stop descriptors, other keepalive names.

The whole stop contract also runs with pipes forced (``make test`` and the
nox sessions run tests/test_stop.py a second time with
THREADSERVE_FORCE_PIPE_BROADCAST=1); these tests check the pieces themselves.
"""

from __future__ import annotations

import os
import select
import socket
import types

import pytest
from support import NOTICE, connect, recv_exactly, recv_until_eof

from threadserve import echo
from threadserve._broadcast import FORCE_PIPE_VARIABLE, GROUP_SIZE, StopBroadcast, pipes_wanted
from threadserve._keepalive import keepalive_options
from threadserve.testing import running_server

pytestmark = pytest.mark.timeout(60)


def readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("use_pipe", [True, False], ids=["pipe", "eventfd"])
def test_a_released_group_stays_readable_and_others_stay_quiet(use_pipe: bool) -> None:
    broadcast = StopBroadcast(use_pipe=use_pipe)
    assert broadcast.kind == ("pipe" if use_pipe else "eventfd")
    first_group, first = broadcast.assign(0)
    second_group, second = broadcast.assign(GROUP_SIZE)  # A second group once GROUP_SIZE are live.
    assert first_group != second_group
    assert not readable(first)
    assert not readable(second)
    broadcast.release(first_group)
    for _ in range(3):  # Never drained: every later poll sees the stop at once.
        assert readable(first)
    assert not readable(second)
    for _ in range(3):  # Releasing again is harmless.
        broadcast.release_all()
    assert readable(second)
    broadcast.close()
    assert not is_open(first)
    assert not is_open(second)


def test_pipes_cost_two_descriptors_per_group_and_all_are_closed() -> None:
    before = len(os.listdir("/proc/self/fd"))
    broadcast = StopBroadcast(use_pipe=True)
    broadcast.assign(2 * GROUP_SIZE + 1)  # Three groups.
    assert len(os.listdir("/proc/self/fd")) == before + 6
    broadcast.close()
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({FORCE_PIPE_VARIABLE: "1"}, True),
        ({FORCE_PIPE_VARIABLE: "yes"}, True),
        ({FORCE_PIPE_VARIABLE: "0"}, False),
        ({FORCE_PIPE_VARIABLE: ""}, False),
    ],
)
def test_the_fallback_is_forced_by_the_environment(environ: dict[str, str], expected: bool) -> None:
    assert pipes_wanted(environ) is expected


def test_no_eventfd_means_pipes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "eventfd")
    assert pipes_wanted({}) is True
    broadcast = StopBroadcast()
    assert broadcast.kind == "pipe"
    broadcast.close()


def test_a_server_with_pipes_keeps_the_stop_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FORCE_PIPE_VARIABLE, "1")
    with running_server(echo) as server:
        assert server._broadcast.kind == "pipe"
        with connect(server.tcp_address) as client:
            client.sendall(b"before the stop")
            assert recv_exactly(client, 15) == b"before the stop"
            report = server.stop()
            assert recv_until_eof(client) == NOTICE
    assert report is not None
    assert report.clean
    assert report.drained == 1


def test_keepalive_on_linux_uses_keepidle() -> None:
    options = keepalive_options(60, 10, 3)
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in options
    assert (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60) in options
    assert (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10) in options
    assert (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3) in options


def test_keepalive_on_macos_uses_tcp_keepalive_for_the_idle_time() -> None:
    # macOS's constants (netinet/tcp.h): no TCP_KEEPIDLE there.
    macos = types.SimpleNamespace(
        SOL_SOCKET=0xFFFF,
        SO_KEEPALIVE=0x0008,
        IPPROTO_TCP=6,
        TCP_KEEPALIVE=0x10,
        TCP_KEEPINTVL=0x101,
        TCP_KEEPCNT=0x102,
    )
    assert keepalive_options(60, 10, 3, macos) == [
        (0xFFFF, 0x0008, 1),
        (6, 0x10, 60),
        (6, 0x101, 10),
        (6, 0x102, 3),
    ]


def test_keepalive_without_timing_options_still_turns_keepalive_on() -> None:
    bare = types.SimpleNamespace(SOL_SOCKET=1, SO_KEEPALIVE=9, IPPROTO_TCP=6)
    assert keepalive_options(60, 10, 3, bare) == [(1, 9, 1)]


def test_accepted_sockets_carry_the_keepalive_settings() -> None:
    with running_server(echo) as server, connect(server.tcp_address) as client:
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"
        (conn,) = server.connections()
        sock = conn._sock  # Options are inherited from the listener: read them back.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
