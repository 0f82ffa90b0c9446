from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from threadserve import Handler
from threadserve.testing import RunningServer, running_server

ServerFactory = Callable[..., RunningServer]


@pytest.fixture
def serve() -> Iterator[ServerFactory]:
    """Start servers on free loopback ports; each is stopped at teardown."""
    contexts: list[Any] = []

    def start(handler: Handler, **settings: Any) -> RunningServer:
        context = running_server(handler, **settings)
        contexts.append(context)
        return context.__enter__()

    yield start
    for context in reversed(contexts):
        context.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _no_thread_left_behind() -> Iterator[None]:
    """Every test must leave no server or connection thread running."""
    yield
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("threadserve")]
    assert not leftover, f"threads left behind: {leftover}"


@pytest.fixture(autouse=True)
def _debug_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="threadserve")
