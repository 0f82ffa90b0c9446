"""What every Python peer shares: its command line and its file limit."""

from __future__ import annotations

import argparse
import resource
from collections.abc import Callable

# The blocking workload's per-request call: long enough to dominate the
# per-request overhead of every peer, short enough that 1,000 connections
# still complete many requests in a short run.
BLOCKING_SECONDS = 0.010

WORKLOADS = ("echo", "blocking")


def parse_args(
    description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """Parse `--port P [--host H] [--workload echo|blocking]`, plus a peer's own options.

    `extra` adds the options only one peer has (asyncio-pool's `--pool`).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--workload", choices=WORKLOADS, default="echo")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if not args.host.startswith("127."):
        parser.error("the benchmark peers only listen on loopback (127.0.0.0/8)")
    raise_nofile_limit()
    return args


def raise_nofile_limit() -> None:
    """Raise the soft open-file limit to the hard one.

    10,000 connections need 10,000 descriptors in the server alone, above the
    usual soft limit of 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
