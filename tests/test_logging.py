"""Logs that machines read: ``--log-format json``, one object per line, with the facts as keys."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from support import (
    NOTICE,
    ServerProcess,
    connect,
    recv_exactly,
    recv_until_eof,
    subprocess_env,
    wait_until,
)

from threadserve import echo
from threadserve._logging import JsonFormatter, configure_logging, counted
from threadserve._proxy import Command, Family, ProxyAddress, ProxyInfo, Transport, build_header
from threadserve.testing import running_server

pytestmark = pytest.mark.timeout(60)


def record(message: str, *args: object, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("threadserve", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


@pytest.mark.parametrize(
    ("count", "expected"), [(0, "0 clients"), (1, "1 client"), (2, "2 clients")]
)
def test_a_count_in_a_log_line_takes_the_noun_s_number(count: int, expected: str) -> None:
    assert counted(count, "client") == expected


def test_a_record_becomes_one_json_object_on_one_line() -> None:
    line = JsonFormatter().format(
        record(
            "connection closed: %s\nsecond line",
            "127.0.0.1:5000",
            event="connection_closed",
            peer="127.0.0.1:5000",
            duration=0.1234567891,
            bytes_in=5,
            bytes_out=7,
            reason="completed",
        )
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["event"] == "connection_closed"
    assert entry["message"] == "connection closed: 127.0.0.1:5000\nsecond line"
    assert entry["peer"] == "127.0.0.1:5000"
    assert entry["duration"] == pytest.approx(0.123457)
    assert (entry["bytes_in"], entry["bytes_out"], entry["reason"]) == (5, 7, "completed")
    assert entry["level"] == "INFO"
    assert entry["logger"] == "threadserve"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert "worker" not in entry


def test_a_record_without_fields_is_an_application_log_line() -> None:
    entry = json.loads(JsonFormatter().format(record("hello %d", 3)))
    assert entry["event"] == "log"
    assert entry["message"] == "hello 3"
    assert not {"peer", "duration", "bytes_in", "bytes_out", "reason"} & entry.keys()


def test_the_worker_is_on_every_line_of_a_worker() -> None:
    entry = json.loads(JsonFormatter(worker=4321).format(record("x", event="serving")))
    assert entry["worker"] == 4321


def test_an_exception_is_kept_with_its_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record("handler failed", event="log")
        failed.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(failed))
    assert "ValueError: boom" in entry["exception"]
    assert "Traceback" in entry["exception"]


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The threadserve logger's records as JSON lines, in memory."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("threadserve")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_the_server_logs_each_connection_with_its_facts(json_log: io.StringIO) -> None:
    with running_server(echo) as server:
        with connect(server.tcp_address) as client:
            host, port = client.getsockname()[:2]
            client_address = f"{host}:{port}"
            client.sendall(b"hello")
            assert recv_exactly(client, 5) == b"hello"
            client.shutdown(socket.SHUT_WR)
            assert recv_until_eof(client) == b""
        wait_until(lambda: server.statistics().connections_closed == 1)
    seen = events(json_log)
    by_event = {entry["event"]: entry for entry in seen}
    assert {"serving", "connection_opened", "connection_closed", "stopping", "stopped"} <= set(
        by_event
    ), seen
    opened, closed = by_event["connection_opened"], by_event["connection_closed"]
    assert opened["peer"] == closed["peer"] == client_address
    assert closed["bytes_in"] == closed["bytes_out"] == 5
    assert closed["reason"] == "completed"
    assert isinstance(closed["duration"], float)
    assert closed["duration"] >= 0
    assert by_event["stopped"]["reason"] == "clean"


def test_behind_a_proxy_the_lines_name_the_reported_client(json_log: io.StringIO) -> None:
    """PROXY protocol on: ``peer`` is the client the proxy reported, ``proxy`` the proxy."""
    header = build_header(
        ProxyInfo(
            version=2,
            command=Command.PROXY,
            family=Family.INET,
            transport=Transport.STREAM,
            source=ProxyAddress("203.0.113.9", 40000),
            destination=ProxyAddress("198.51.100.1", 443),
        )
    )
    with running_server(echo, proxy_protocol="v2") as server:
        with connect(server.tcp_address) as client:
            host, port = client.getsockname()[:2]
            client.sendall(header + b"hello")
            assert recv_exactly(client, 5) == b"hello"
            client.shutdown(socket.SHUT_WR)
            assert recv_until_eof(client) == b""
        wait_until(lambda: server.statistics().connections_closed == 1)
    by_event = {entry["event"]: entry for entry in events(json_log)}
    opened, closed = by_event["connection_opened"], by_event["connection_closed"]
    assert opened["peer"] == closed["peer"] == "203.0.113.9:40000"
    assert opened["proxy"] == f"{host}:{port}"
    assert "203.0.113.9:40000" in opened["message"]
    assert closed["bytes_in"] == len(header) + 5


def test_a_connection_drained_at_stop_says_so(json_log: io.StringIO) -> None:
    with running_server(echo) as server, connect(server.tcp_address) as client:
        client.sendall(b"ping")
        assert recv_exactly(client, 4) == b"ping"
        server.stop()
        assert recv_until_eof(client) == NOTICE
    (closed,) = [entry for entry in events(json_log) if entry["event"] == "connection_closed"]
    assert closed["reason"] == "stopped"
    assert closed["bytes_out"] == 4 + len(NOTICE)


def test_a_turned_away_client_is_logged_with_the_limit(json_log: io.StringIO) -> None:
    with (
        running_server(echo, max_connections=1, overload="reject") as server,
        connect(server.tcp_address) as first,
    ):
        first.sendall(b"x")
        assert recv_exactly(first, 1) == b"x"
        with connect(server.tcp_address) as second:
            assert recv_until_eof(second).startswith(b"Server busy")
    (rejected,) = [entry for entry in events(json_log) if entry["event"] == "connection_rejected"]
    assert rejected["reason"] == "max_connections"
    assert rejected["level"] == "WARNING"


def test_the_text_format_reads_as_before() -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", "text", stream=stream)
    try:
        logging.getLogger("threadserve").info(
            "connection closed: %s", "peer", extra={"event": "connection_closed", "peer": "peer"}
        )
    finally:
        logging.getLogger().removeHandler(handler)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO threadserve: connection closed: peer\n",
        stream.getvalue(),
    )


def test_log_format_json_from_the_command_line() -> None:
    with ServerProcess(
        ["echo", "--bind", "127.0.0.1:0", "--log-format", "json"], env=subprocess_env()
    ) as server:
        port = int(server.wait_for_log(r'"message": "serving on 127\.0\.0\.1:(\d+)"').group(1))
        with connect(("127.0.0.1", port)) as client:
            client.sendall(b"abc")
            assert recv_exactly(client, 3) == b"abc"
            server.send_signal(signal.SIGTERM)
            assert recv_until_eof(client) == NOTICE
        assert server.wait_exit() == 0, server.output()
        lines = server.output().splitlines()
    entries = [json.loads(line) for line in lines]  # Every line is one JSON object.
    (closed,) = [entry for entry in entries if entry["event"] == "connection_closed"]
    assert closed["bytes_in"] == 3
    assert closed["bytes_out"] == 3 + len(NOTICE)
    assert closed["reason"] == "stopped"
    assert any(entry["event"] == "stopped" for entry in entries)
    assert not any("worker" in entry for entry in entries)  # One process: no worker.


def test_json_lines_of_workers_name_the_worker() -> None:
    with ServerProcess(
        ["echo", "--bind", "127.0.0.1:0", "--workers", "2", "--log-format", "json"],
        env=subprocess_env(),
    ) as server:
        started = server.wait_for_log(
            r'"message": "supervisor (\d+): 2 workers on 127\.0\.0\.1:(\d+)"'
        )
        supervisor, port = int(started.group(1)), int(started.group(2))
        # Both workers serving (a stop while one still starts is another test's matter).
        serving = r'"event": "serving"[^\n]*"worker": \d+'
        server.wait_for_log(serving + r"[\s\S]*" + serving)
        with connect(("127.0.0.1", port)) as client:
            client.sendall(b"abc")
            assert recv_exactly(client, 3) == b"abc"
        server.wait_for_log(r'"event": "connection_closed"')
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.output()
        entries = [json.loads(line) for line in server.output().splitlines()]
    (closed,) = [entry for entry in entries if entry["event"] == "connection_closed"]
    assert isinstance(closed["worker"], int)
    assert closed["worker"] != supervisor
    # The supervisor's own lines carry no worker.
    assert not any("worker" in entry for entry in entries if "supervisor" in entry["message"])
