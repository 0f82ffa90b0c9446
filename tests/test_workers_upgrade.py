"""An upgrade (SIGUSR2) hands the agent's and the metrics' sockets over: neither is ever refused."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import SETTLE, recv_exactly, recv_until_eof, subprocess_env
from test_upgrade import Supervised, alive, folder, workers_of
from test_workers import wait_for

pytestmark = pytest.mark.timeout(120)

__all__ = ["folder"]  # The fixture, used by name.

AGENT_LINE = r"agent-check answered on (127\.0\.0\.1:\d+) \(by the supervisor\)"
METRICS_LINE = r"metrics on (http://127\.0\.0\.1:\d+/metrics)"


def accepted(url: str) -> float:
    with urllib.request.urlopen(url, timeout=SETTLE) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "threadserve_connections_accepted_total":
                return sample.value
    raise AssertionError(f"no accepted count in {text!r}")


def ask_agent(address: str) -> str:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=SETTLE) as sock:
            return recv_until_eof(sock).decode()
    except ConnectionRefusedError:
        return "refused"


class Prober:
    """Asks the agent and scrapes the metrics in a loop, bounded in count and time."""

    def __init__(self, agent: str, url: str) -> None:
        self.agent, self.url = agent, url
        self.answers: Counter[str] = Counter()
        self.scrapes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober")
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 90
        for _ in range(5000):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            self.answers[ask_agent(self.agent)] += 1
            try:
                accepted(self.url)
                self.scrapes["ok"] += 1
            except (urllib.error.URLError, OSError) as exc:
                self.scrapes[repr(exc)] += 1
            self._stop.wait(0.02)  # Pacing, not a wait for state.

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(SETTLE)


def echo(address: tuple[str, int], count: int) -> None:
    for number in range(count):
        with socket.create_connection(address, timeout=SETTLE) as client:
            line = b"client %d\n" % number
            client.sendall(line)
            assert recv_exactly(client, len(line)) == line


def test_an_upgrade_hands_the_agent_and_the_metrics_over(folder: Path) -> None:
    server = Supervised(
        folder, "--agent-bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0", env=subprocess_env()
    )
    try:
        agent = server.process.wait_for_log(AGENT_LINE).group(1)
        url = server.process.wait_for_log(METRICS_LINE).group(1)
        old = server.supervisor()
        echo(server.address, 5)
        assert accepted(url) == 5
        prober = Prober(agent, url)
        try:
            os.kill(old, signal.SIGUSR2)
            wait_for(lambda: not alive(old), 60, "the old supervisor to exit")
            new = server.supervisor()
            assert new != old
            wait_for(lambda: len(workers_of(new)) == 2, 30, "the new workers")
            wait_for(lambda: sum(prober.answers.values()) >= 5, 30, "checks after the upgrade")
        finally:
            prober.finish()
        # Both addresses answered all along: never refused, never a failed scrape.
        assert set(prober.answers) == {"up ready\n"}, prober.answers
        assert set(prober.scrapes) == {"ok"}, prober.scrapes
        # The new supervisor serves both now. Its counts start from zero: the
        # old one's went with it (a counter reset, which rate() allows for).
        assert f"supervisor {new} is the one serving now" in server.output()
        echo(server.address, 3)
        assert accepted(url) == 3
        assert ask_agent(agent) == "up ready\n"
        os.kill(new, signal.SIGTERM)
        assert server.process.wait_exit(SETTLE) == 0, server.output()
        print(f"\nduring the upgrade: agent {dict(prober.answers)}, scrapes {dict(prober.scrapes)}")
    finally:
        server.close()
