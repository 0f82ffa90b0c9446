"""Cancel tokens and the callback runner on their own, without a server."""

from __future__ import annotations

import logging
import threading

import pytest

from threadserve import CancelToken
from threadserve._cancel import CallbackRunner

SETTLE = 10.0  # Generous: these waits end on an event, long before this.


def test_a_token_is_set_once_and_keeps_its_first_reason() -> None:
    token = CancelToken()
    assert (token.cancelled, token.reason) == (False, None)
    assert token.cancel("server stopping") is True
    assert token.cancel("deadline") is False
    assert (token.cancelled, token.reason) == (True, "server stopping")
    assert "server stopping" in repr(token)


def test_callbacks_run_once_in_the_order_they_were_registered() -> None:
    token = CancelToken()
    ran: list[str] = []
    token.on_cancel(lambda: ran.append("first"))
    token.on_cancel(lambda: ran.append("second"))
    token.cancel()
    token.cancel()
    assert ran == ["first", "second"]


def test_a_callback_registered_after_the_cancel_runs_at_once() -> None:
    token = CancelToken()
    token.cancel()
    ran: list[str] = []
    token.on_cancel(lambda: ran.append("late"))
    assert ran == ["late"]


def test_an_unregistered_callback_never_runs() -> None:
    token = CancelToken()
    ran: list[str] = []
    remove = token.on_cancel(lambda: ran.append("removed"))
    remove()
    remove()  # Twice is harmless.
    token.cancel()
    assert ran == []


def test_a_failing_callback_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = CancelToken()
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("cursor already closed")

    token.on_cancel(broken)
    token.on_cancel(lambda: ran.append("after"))
    with caplog.at_level(logging.ERROR, logger="threadserve"):
        assert token.cancel() is True
    assert ran == ["after"]
    assert "cursor already closed" in caplog.text


def test_wait_returns_when_another_thread_cancels() -> None:
    token = CancelToken()
    assert token.wait(timeout=0) is False
    canceller = threading.Thread(target=token.cancel, args=("stop",))
    canceller.start()
    assert token.wait(timeout=SETTLE) is True
    canceller.join(SETTLE)
    assert token.wait() is True, "a cancelled token never blocks"


def test_the_runner_runs_callbacks_off_the_cancelling_thread_in_order() -> None:
    runner = CallbackRunner("test cancel callbacks")
    token = CancelToken()
    threads: list[str] = []
    done = threading.Event()
    token.on_cancel(lambda: threads.append(threading.current_thread().name))
    token.on_cancel(done.set)
    token.cancel(runner=runner)
    assert done.wait(SETTLE)
    assert threads == ["test cancel callbacks"]
    assert runner.close(timeout=SETTLE) is None


def test_the_runner_names_the_callback_it_is_stuck_in() -> None:
    runner = CallbackRunner("test stuck callbacks")
    release = threading.Event()
    entered = threading.Event()

    def stuck() -> None:
        entered.set()
        release.wait(SETTLE)

    runner.submit(stuck)
    assert entered.wait(SETTLE)
    try:
        left = runner.close(timeout=0.05)
        assert left is not None
        thread, callback = left
        assert callback is stuck
        assert thread.name == "test stuck callbacks"
        assert thread.is_alive()
    finally:
        release.set()
    thread.join(SETTLE)
    assert not thread.is_alive()


def test_a_runner_never_used_starts_no_thread() -> None:
    runner = CallbackRunner("test runner never used")
    assert runner.close(timeout=SETTLE) is None
    assert "test runner never used" not in {thread.name for thread in threading.enumerate()}
