"""Prometheus metrics: what they count, promtool's lint, and a real Prometheus scraping."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import FrameType

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import (
    NOTICE,
    SETTLE,
    ServerProcess,
    connect,
    free_port,
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


# With an idle timeout too, the read timeout, the nearer deadline, is the one that ends it.
@pytest.mark.parametrize("timeouts", [Timeouts(read=0.2), Timeouts(idle=5, read=0.2)])
def test_a_read_timeout_is_counted_by_its_reason(timeouts: Timeouts) -> None:
    def reads(conn: Connection) -> None:
        conn.readline(limit=100)

    registry = CollectorRegistry()
    with running_server(reads, metrics=registry, timeouts=timeouts) as server:
        with connect(server.tcp_address) as client:
            client.sendall(b"no end of line")
            recv_until_eof(client)  # The timeout notice, then EOF.
        wait_until(lambda: server.statistics().connections_closed == 1)
    assert value(registry, "threadserve_connections_closed_total", reason="read_timeout") == 1


@pytest.mark.parametrize(
    ("timeouts", "message"),
    [
        (Timeouts(idle=0.2), "no data from 127.0.0.1:"),
        # The client keeps sending, so only the lifetime can end it.
        (Timeouts(lifetime=0.5), "reached the end of its lifetime (0.5 s)"),
    ],
)
def test_idle_and_lifetime_timeouts_are_counted_as_timeout_not_read_timeout(
    timeouts: Timeouts, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    def echo_lines(conn: Connection) -> None:
        while line := conn.readline(limit=100):
            conn.sendall(line)

    registry = CollectorRegistry()
    with running_server(echo_lines, metrics=registry, timeouts=timeouts) as server:
        with connect(server.tcp_address) as client:
            client.sendall(b"tick\n")
            client.settimeout(0.1)
            for _ in range(100):  # Bounded: about 10 s at most, far past either timeout.
                try:
                    data = client.recv(4096)
                except TimeoutError:
                    if timeouts.lifetime is not None:
                        client.sendall(b"tick\n")  # Never idle: only the lifetime can end it.
                    continue
                if not data:
                    break  # The timeout notice came, then EOF.
        wait_until(lambda: server.statistics().connections_closed == 1)
    assert value(registry, "threadserve_connections_closed_total", reason="timeout") == 1
    assert value(registry, "threadserve_connections_closed_total", reason="read_timeout") == 0
    assert any(message in record.getMessage() for record in caplog.records)


def test_proxy_rejections_are_counted() -> None:
    """Bad, late or untrusted PROXY headers: threadserve_proxy_rejected_total."""
    registry = CollectorRegistry()
    with running_server(echo, metrics=registry, proxy_protocol="v1") as server:
        for line in (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", b"GET / HTTP/1.1\r\n"):
            with connect(server.tcp_address) as client:
                client.sendall(line)
                with contextlib.suppress(ConnectionResetError):
                    recv_until_eof(client)
        wait_until(lambda: server.statistics().connections_closed == 2)
        assert value(registry, "threadserve_proxy_rejected_total") == 2
        assert value(registry, "threadserve_connections_closed_total", reason="proxy_error") == 2


def calls_per_message(metrics: CollectorRegistry | None) -> Counter[str]:
    """Every Python and C call a connection thread makes over 200 echoed messages.

    The handler profiles its own thread (``sys.setprofile``) around the loop,
    after a warm-up, so only the per-message path is counted: ``recv`` and
    ``sendall`` and what they call.
    """
    counted: list[Counter[str]] = []

    def handler(conn: Connection) -> None:
        for _ in range(20):
            conn.sendall(conn.recv(64))
        calls: Counter[str] = Counter()

        def profile(frame: FrameType, event: str, arg: object) -> None:
            if event == "call":
                calls[frame.f_code.co_name] += 1
            elif event == "c_call":
                calls[getattr(arg, "__qualname__", repr(arg))] += 1

        sys.setprofile(profile)
        try:
            for _ in range(200):
                conn.sendall(conn.recv(64))
        finally:
            sys.setprofile(None)
        counted.append(calls)

    with running_server(handler, metrics=metrics) as server, connect(server.tcp_address) as client:
        for _ in range(220):
            # One message in flight at a time: each recv gets a whole one.
            client.sendall(b"x" * 64)
            assert recv_exactly(client, 64) == b"x" * 64
        wait_until(lambda: len(counted) == 1, what="the handler to finish")
    calls = counted[0]
    del calls["setprofile"]
    return calls


def test_metrics_add_nothing_to_the_per_message_path() -> None:
    """The same calls per echoed message with metrics on as off.

    The metrics are read from the server's own counters at scrape time; a
    prometheus-client ``Counter.inc()`` per message would show here as calls
    (and a lock) that only the metrics run makes.
    """
    off = calls_per_message(None)
    on = calls_per_message(CollectorRegistry())
    per_message = f"{sum(off.values()) / 200:g} off, {sum(on.values()) / 200:g} on"
    print(f"calls per echoed message: {per_message}")
    assert on == off
    assert off["recv"] == 200


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


# ------------------------------------------------------------------ with workers

WORKERS_READY = r"(\d+) workers ready, serving on 127\.0\.0\.1:(\d+)$"
METRICS_LINE = r"metrics on (http://127\.0\.0\.1:\d+/metrics)"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SETTLE) as response:
        text: str = response.read().decode()
        return text


def scraped_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def live_workers(server: ServerProcess) -> set[int]:
    children = psutil.Process(server.process.pid).children()
    return {child.pid for child in children if child.status() != psutil.STATUS_ZOMBIE}


def test_workers_one_scrape_sums_every_worker_and_counts_restarts() -> None:
    """--workers 2 --metrics: the supervisor's scrape is the sum, and it never goes back.

    A worker killed (SIGKILL: no last word) and two replaced by a reload
    leave what they had reported in the sums; the restarts are counted by
    reason.
    """
    with ServerProcess(
        ["echo", "--bind", "127.0.0.1:0", "--workers", "2", "--metrics", "127.0.0.1:0"],
        env=subprocess_env(),
    ) as server:
        url = server.wait_for_log(METRICS_LINE).group(1)
        port = int(server.wait_for_log(WORKERS_READY).group(2))
        last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

        def sums(accepted: float, closed: float) -> bool:
            nonlocal last
            last = scraped_samples(scrape(url))
            return (
                last[("threadserve_connections_accepted_total", ())] == accepted
                and last[("threadserve_connections_closed_total", (("reason", "completed"),))]
                == closed
            )

        clients = 12
        for number in range(clients):
            echo_once(("127.0.0.1", port), b"client %d\n" % number)
        # Accepted is counted before the echo, closed once the worker's
        # side has closed: the second can lag the client by a moment.
        wait_until(lambda: sums(clients, clients), what="the sums", state=lambda: last)
        text = scrape(url)
        samples_now = scraped_samples(text)
        assert samples_now[("threadserve_workers", ())] == 2
        assert samples_now[("threadserve_bytes_received_total", ())] == sum(
            len(b"client %d\n" % n) for n in range(clients)
        )
        assert samples_now[("threadserve_connection_duration_seconds_count", ())] == clients
        assert samples_now[("threadserve_threads", ())] >= 2  # Every worker's main thread.
        result = subprocess.run(
            ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
        )
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert result.stdout == result.stderr == b""

        # SIGKILL one worker: replaced, counted as crashed, and what it had
        # reported (every connection above was scraped already) stays.
        victim = min(live_workers(server))
        os.kill(victim, signal.SIGKILL)
        server.wait_for_log(rf"worker {victim} was killed by SIGKILL unexpectedly")
        restarts = ("threadserve_worker_restarts_total", (("reason", "crashed"),))
        wait_until(
            lambda: (
                sums(clients, clients)
                and last[restarts] == 1
                and last[("threadserve_workers", ())] == 2
            ),
            what="the crash counted and a replacement serving",
            state=lambda: last,
        )

        # A reload replaces both; their last snapshots keep the sums.
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(r"reloaded: 2 new workers ready")
        reloads = ("threadserve_worker_restarts_total", (("reason", "reload"),))
        wait_until(
            lambda: sums(clients, clients) and last[reloads] == 2,
            what="the reload counted",
            state=lambda: last,
        )
        more = 5
        for number in range(more):
            echo_once(("127.0.0.1", port), b"after %d\n" % number)
        wait_until(
            lambda: sums(clients + more, clients + more), what="the new sums", state=lambda: last
        )
        assert last[("threadserve_worker_restarts_total", (("reason", "hung"),))] == 0
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.output()


def test_workers_a_recycled_worker_leaves_its_counts_in_the_sums() -> None:
    """Nobody scrapes before the worker goes: its last word alone carries its counts."""
    with ServerProcess(
        [
            "echo",
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--max-worker-connections",
            "5",
            "--metrics",
            "127.0.0.1:0",
        ],
        env=subprocess_env(),
    ) as server:
        url = server.wait_for_log(METRICS_LINE).group(1)
        port = int(server.wait_for_log(WORKERS_READY).group(2))
        clients = 6
        for number in range(clients):
            echo_once(("127.0.0.1", port), b"client %d\n" % number)
        server.wait_for_log(r"reached its connection limit: replacing it")
        server.wait_for_log(r"worker \d+ stopped: exited with 0")
        last = scraped_samples(scrape(url))
        assert last[("threadserve_worker_restarts_total", (("reason", "recycled"),))] == 1
        assert last[("threadserve_connections_accepted_total", ())] == clients, last
        assert last[("threadserve_stops_total", (("outcome", "clean"),))] == 1
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.output()


# ------------------------------------------------------------------ a real Prometheus


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


@pytest.mark.parametrize("workers", [None, 2], ids=["one-process", "workers-2"])
def test_a_real_prometheus_scrapes_the_accepted_count(workdir: Path, workers: int | None) -> None:
    clients = 7
    extra = [] if workers is None else ["--workers", str(workers)]
    with ServerProcess(
        ["echo", "--bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0", *extra],
        env=subprocess_env(),
    ) as server:
        target = server.wait_for_log(r"metrics on http://(127\.0\.0\.1:\d+)/metrics").group(1)
        port = int(server.wait_for_log(r"serving on 127\.0\.0\.1:(\d+)$").group(1))
        if workers is not None:
            server.wait_for_log(WORKERS_READY)
        for number in range(clients):
            echo_once(("127.0.0.1", port), b"client %d\n" % number)
        # A connection is counted closed once the server's side has closed,
        # a moment after the client's: wait for that before Prometheus looks.
        completed = ("threadserve_connections_closed_total", (("reason", "completed"),))
        wait_until(
            lambda: scraped_samples(scrape(f"http://{target}/metrics"))[completed] == clients,
            what="every connection closed",
        )

        prometheus_port = free_port()
        (workdir / "prometheus.yml").write_text(
            "global:\n"
            # With workers a scrape waits for their answers: a busy
            # machine gets a second, rather than a failed scrape.
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
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
            if workers is not None:
                (serving,) = query(api, "threadserve_workers")
                assert sample_value(serving) == workers
                restarts = query(api, "sum(threadserve_worker_restarts_total)")
                assert [sample_value(total) for total in restarts] == [0]
        finally:
            prometheus.terminate()
            try:
                prometheus.wait(timeout=30)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.output()
