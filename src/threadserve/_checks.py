"""Checks of configuration values, written once for the API and the CLI.

A value of the wrong type, or a number out of its range, is refused when
the server is configured, with a message naming it. Let through, it would
fail later, on every connection or at the stop: ``poll()`` takes at most
2**31 - 1 ms (about 24.8 days), and a NaN deadline is never reached, so a
drain of NaN seconds would never end.

A range serves two callers: the API raises ``ConfigurationError``
with the parameter's name (``grace=-1: must be ...``); the command line
turns it into an argparse error, which names the flag or the environment
variable and exits with status 2.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ._exceptions import ConfigurationError

#: A stop, a drain or a worker's silence longer than a day is a typing mistake.
MAX_SECONDS = 86400.0
#: The longest per-connection timeout, about 23 days: below poll()'s limit of
#: 2**31 - 1 ms. Longer waits are "no limit" (None, or 'none' on the command line).
MAX_TIMEOUT = 2_000_000.0


@dataclass(frozen=True)
class Seconds:
    """A range of seconds: from ``low`` (itself allowed or not) to ``high``."""

    low: float
    high: float
    low_allowed: bool = True

    def holds(self, value: object) -> bool:
        # NaN fails every comparison, so it is refused like any value out of range.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        above_low = self.low <= value if self.low_allowed else self.low < value
        return above_low and value <= self.high

    def describe(self) -> str:
        # .10g: whole numbers of seconds print whole, 2000000 and not 2e+06.
        if self.low_allowed:
            return f"a number of seconds from {self.low:.10g} to {self.high:.10g}"
        return f"a number of seconds above {self.low:.10g}, at most {self.high:.10g}"

    def check(self, name: str, value: object) -> float:
        """``value`` as a float, or ConfigurationError naming ``name``."""
        if isinstance(value, (int, float)) and self.holds(value):
            return float(value)
        raise ConfigurationError(f"{name}={value!r}: must be {self.describe()}")

    def parse(self, text: str) -> float:
        """For argparse's ``type=``: the command line's text, checked."""
        return _parse(text, float, "a number of seconds", self)


@dataclass(frozen=True)
class Count:
    """A whole number of at least ``minimum`` (and at most ``maximum``, if given)."""

    minimum: int
    what: str = "a whole number"
    maximum: int | None = None

    def holds(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        return self.minimum <= value and (self.maximum is None or value <= self.maximum)

    def describe(self) -> str:
        if self.maximum is not None:
            return f"{self.what}, from {self.minimum} to {self.maximum}"
        return f"{self.what}, {self.minimum} or more"

    def check(self, name: str, value: object) -> int:
        if isinstance(value, int) and self.holds(value):
            return value
        raise ConfigurationError(f"{name}={value!r}: must be {self.describe()}")

    def parse(self, text: str) -> int:
        """For argparse's ``type=``: the command line's text, checked."""
        return _parse(text, int, self.what, self)


class _Range(Protocol):
    def holds(self, value: object) -> bool: ...

    def describe(self) -> str: ...


_Number = TypeVar("_Number", int, float)


def _parse(text: str, convert: Callable[[str], _Number], what: str, valid: _Range) -> _Number:
    """``text`` converted and checked, or argparse's error (which names the flag)."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not valid.holds(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be {valid.describe()}")
    return value


def check_type(name: str, value: object, expected: type | tuple[type, ...], what: str) -> None:
    """ConfigurationError unless ``value`` is one of ``expected`` (``what`` names them)."""
    if not isinstance(value, expected):
        raise ConfigurationError(f"{name}={value!r}: expected {what}")


def check_handler(handler: object) -> None:
    """ConfigurationError unless ``handler`` can be called with one connection."""
    if not callable(handler):
        raise ConfigurationError(f"handler {handler!r} is not callable")
    try:
        # The signature called, not the one a decorator (functools.wraps) wraps:
        # a wrapper may well supply the wrapped function's other arguments.
        signature = inspect.signature(handler, follow_wrapped=False)
    except (TypeError, ValueError):
        return  # Some builtins have no signature to check; they are called as they are.
    try:
        signature.bind(object())
    except TypeError as exc:
        raise ConfigurationError(
            f"handler {handler!r} cannot be called with one connection: {exc}"
        ) from None


#: A stop's grace, a told client's linger, a drain, an idle thread's life.
SHORT_WAIT = Seconds(0.0, MAX_SECONDS)
#: What must be above zero: a worker's allowed silence.
INTERVAL = Seconds(0.0, MAX_SECONDS, low_allowed=False)
#: A per-connection timeout (idle, read, write, handshake, lifetime, PROXY header).
TIMEOUT = Seconds(0.0, MAX_TIMEOUT, low_allowed=False)
#: Connection threads kept parked; a read's size in bytes.
IDLE_THREADS = Count(0, "a count of threads")
CHUNK_SIZE = Count(1, "a byte count")
#: What a Group may queue for one member.
MAX_QUEUED = Count(1, "a byte count")
#: Each worker is a whole interpreter (tens of MiB): a typo such as
#: ``--workers 40000`` would fork until memory or pids ran out. 1,024 is far
#: above any core count this is meant for, and SIGTTIN stops there too.
MAX_WORKERS = 1024
WORKERS = Count(1, "a count of workers", MAX_WORKERS)
#: Connections a client may hold at once.
CONNECTIONS = Count(1, "a count of connections")
#: Connections a worker serves before it is replaced (0: never replaced).
WORKER_CONNECTIONS = Count(0, "a count of connections")
