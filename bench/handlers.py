"""threadserve handlers used by the benchmarks.

Run as `python -m threadserve serve bench.handlers:blocking_echo ...` from the
repository root, so that `bench` is importable.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from bench.peers._common import BLOCKING_SECONDS


class ChunkConnection(Protocol):
    """The part of threadserve's `Connection` these handlers use.

    Typed structurally so the benchmarks type-check on their own.
    """

    def __iter__(self) -> Iterator[bytes]: ...

    def sendall(self, data: bytes, /) -> None: ...


def blocking_echo(conn: ChunkConnection) -> None:
    """Echo each received chunk after a 10 ms blocking call, in plain code.

    This is the case thread-per-connection is for: the handler just calls the
    blocking function, with no executor and no await.
    """
    for chunk in conn:
        time.sleep(BLOCKING_SECONDS)
        conn.sendall(chunk)
