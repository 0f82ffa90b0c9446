"""The rate-limited log on its own, on a clock the test moves."""

from __future__ import annotations

import logging

import pytest

from threadserve._ratelimit import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_the_first_event_is_logged_and_the_burst_after_it_is_held_back(
    caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    log = RateLimitedLog(logging.getLogger("threadserve.test"), logging.WARNING, clock=clock)
    with caplog.at_level(logging.WARNING, logger="threadserve.test"):
        assert log.emit("accept failed: %s", "EMFILE") is True
        for step in range(1, 6):
            clock.now = 100.0 + step * 0.15
            assert log.emit("accept failed: %s", "EMFILE") is False
        assert messages(caplog) == ["accept failed: EMFILE"]
        clock.now = 101.0  # A whole interval after the first line.
        assert log.emit("accept failed: %s", "ENFILE") is True
    assert messages(caplog)[1] == "accept failed: ENFILE (5 more like this in the last 1 s)"


def test_after_a_quiet_interval_the_next_line_counts_nothing_held_back(
    caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    log = RateLimitedLog(logging.getLogger("threadserve.test"), logging.INFO, 2.0, clock)
    with caplog.at_level(logging.INFO, logger="threadserve.test"):
        log.emit("turning away %s", "a")
        clock.now += 2.0
        log.emit("turning away %s", "b")
    assert messages(caplog) == ["turning away a", "turning away b"]


def test_the_structured_fields_reach_the_record(
    caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    log = RateLimitedLog(logging.getLogger("threadserve.test"), logging.WARNING, clock=clock)
    with caplog.at_level(logging.WARNING, logger="threadserve.test"):
        log.emit("turning away %s", "peer", extra={"event": "connection_rejected"})
    assert caplog.records[0].event == "connection_rejected"  # type: ignore[attr-defined]
