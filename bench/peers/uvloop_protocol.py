"""Peer: uvloop with the same `Protocol` classes as the asyncio peer.

uvloop replaces the event loop only; the protocol code, and `to_thread` with
its default executor for the blocking workload, are the asyncio peer's.
"""

from __future__ import annotations

import uvloop

from bench.peers._common import parse_args
from bench.peers.asyncio_protocol import serve


def main() -> None:
    args = parse_args(__doc__ or "")
    # uvloop.run() is the entry point uvloop recommends since 0.18.
    uvloop.run(serve(args.host, args.port, args.workload))


if __name__ == "__main__":
    main()
