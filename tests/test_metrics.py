"""Prometheus metrics: what they count, promtool's lint, and a real Prometheus scraping."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import (
    NOTICE,
    SETTLE,
    ServerProcess,
    connect,
    recv_exactly,
    recv_until_eof,
    subprocess_env,
    wait_until,
)

from threadserve import Connection, Server, Timeouts, echo
from threadserve.testing import running_server

pytestmark = pytest.mark.timeout(120)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape, by (name, sorted labels)."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return samples(registry)[(name, tuple(sorted(labels.items())))]


def closed_at_least(server: Server, count: int) -> bool:
    return server.statistics().connections_closed >= count


def echo_once(address: tuple[str, int], payload: bytes) -> None:
    with connect(address) as client:
        client.sendall(payload)
        assert recv_exactly(client, len(payload)) == payload


def test_the_counters_follow_what_clients_did() -> None:
    registry = CollectorRegistry()
    with running_server(echo, metrics=registry, max_connections=1, overload="reject") as server:
        for served in range(1, 4):
            echo_once(server.tcp_address, b"12345")
            # Its slot is free only once the server has closed it: wait, or the
            # next client could find the one slot still taken and be turned away.
            wait_until(partial(closed_at_least, server, served))
        with connect(server.tcp_address) as held:
            held.sendall(b"x")
            assert recv_exactly(held, 1) == b"x"
            assert value(registry, "threadserve_connections_active") == 1
            with connect(server.tcp_address) as turned_away:
                assert recv_until_eof(turned_away).startswith(b"Server busy")
            server.stop()
            assert recv_until_eof(held) == NOTICE
    assert value(registry, "threadserve_connections_accepted_total") == 4
    assert value(registry, "threadserve_connections_active") == 0
    assert value(registry, "threadserve_connections_closed_total", reason="completed") == 3
    assert value(registry, "threadserve_connections_closed_total", reason="stopped") == 1
    assert value(registry, "threadserve_connections_rejected_total", reason="max_connections") == 1
    assert value(registry, "threadserve_bytes_received_total") == 3 * 5 + 1
    assert value(registry, "threadserve_bytes_sent_total") == 3 * 5 + 1 + len(NOTICE)
    assert value(registry, "threadserve_connection_duration_seconds_count") == 4
    assert value(registry, "threadserve_connection_duration_seconds_bucket", le="+Inf") == 4
    assert value(registry, "threadserve_stops_total", outcome="clean") == 1
    assert value(registry, "threadserve_stops_total", outcome="forced") == 0
    assert value(registry, "threadserve_stop_duration_seconds_count") == 1
    assert value(registry, "threadserve_handler_errors_total") == 0
    assert value(registry, "threadserve_accept_errors_total") == 0
    assert value(registry, "threadserve_threads") >= 1


def test_closing_reasons_are_a_fixed_set() -> None:
    def failing(conn: Connection) -> None:
        raise RuntimeError("deliberate")

    registry = CollectorRegistry()
    with running_server(failing, metrics=registry) as server:
        with connect(server.tcp_address) as client:
            assert recv_until_eof(client) == b""
        wait_until(lambda: server.statistics().connections_closed == 1)
    assert value(registry, "threadserve_connections_closed_total", reason="handler_error") == 1
    assert value(registry, "threadserve_handler_errors_total") == 1
    reasons = {
        dict(labels)["reason"]
        for (name, labels) in samples(registry)
        if name == "threadserve_connections_closed_total"
    }
    # Every reason is always there (0 until it happens): no label is made up at run time.
    assert {"completed", "stopped", "reset", "read_timeout", "handler_error"} <= reasons


def test_a_read_timeout_is_counted_by_its_reason() -> None:
    def reads(conn: Connection) -> None:
        conn.readline(limit=100)

    registry = CollectorRegistry()
    with running_server(reads, metrics=registry, timeouts=Timeouts(read=0.2)) as server:
        with connect(server.tcp_address) as client:
            client.sendall(b"no end of line")
            recv_until_eof(client)  # The timeout notice, then EOF.
        wait_until(lambda: server.statistics().connections_closed == 1)
    assert value(registry, "threadserve_connections_closed_total", reason="read_timeout") == 1


def test_promtool_finds_nothing_wrong_with_a_scrape() -> None:
    registry = CollectorRegistry()
    with running_server(echo, metrics=registry) as server:
        echo_once(server.tcp_address, b"hello")
        wait_until(lambda: server.statistics().connections_closed == 1)
        scrape = generate_latest(registry)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=scrape, capture_output=True, timeout=60
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout == b""
    assert result.stderr == b""


def test_metrics_with_workers_is_refused_for_now() -> None:
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
            "--metrics",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "--metrics does not work with --workers yet" in result.stderr


# ------------------------------------------------------------------ a real Prometheus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="threadserve-prometheus-") as name:
        yield Path(name)


def query(prometheus: str, expression: str) -> list[dict[str, object]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=SETTLE) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    result: list[dict[str, object]] = answer["data"]["result"]
    return result


def sample_value(sample: dict[str, object]) -> float:
    """The value of one instant-query result: ``"value": [timestamp, "7"]``."""
    pair = sample["value"]
    assert isinstance(pair, list)
    return float(pair[1])


def test_a_real_prometheus_scrapes_the_accepted_count(workdir: Path) -> None:
    clients = 7
    with ServerProcess(
        ["echo", "--bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0"], env=subprocess_env()
    ) as server:
        target = server.wait_for_log(r"metrics on http://(127\.0\.0\.1:\d+)/metrics").group(1)
        port = int(server.wait_for_log(r"serving on 127\.0\.0\.1:(\d+)$").group(1))
        for number in range(clients):
            echo_once(("127.0.0.1", port), b"client %d\n" % number)

        prometheus_port = free_port()
        (workdir / "prometheus.yml").write_text(
            "global:\n"
            "  scrape_interval: 500ms\n"
            "  scrape_timeout: 400ms\n"
            "scrape_configs:\n"
            "  - job_name: threadserve\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        prometheus_binary = shutil.which("prometheus")
        assert prometheus_binary, "scripts/system-packages installs prometheus"
        with open(workdir / "prometheus.log", "wb") as log:
            prometheus = subprocess.Popen(
                [
                    prometheus_binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=workdir,
            )
        try:
            api = f"http://127.0.0.1:{prometheus_port}"
            seen: list[dict[str, object]] = []

            def scraped() -> bool:
                nonlocal seen
                assert prometheus.poll() is None, (workdir / "prometheus.log").read_text()
                try:
                    seen = query(api, "threadserve_connections_accepted_total")
                except OSError:
                    return False  # Not listening yet.
                return bool(seen)

            wait_until(scraped, timeout=SETTLE * 2, what="Prometheus to scrape threadserve")
            (sample,) = seen
            assert sample["metric"] == {
                "__name__": "threadserve_connections_accepted_total",
                "instance": target,
                "job": "threadserve",
            }
            assert sample_value(sample) == clients
            print(f"Prometheus query threadserve_connections_accepted_total: {seen}")
            (closed,) = query(api, 'threadserve_connections_closed_total{reason="completed"}')
            assert sample_value(closed) == clients
        finally:
            prometheus.terminate()
            try:
                prometheus.wait(timeout=30)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.output()
