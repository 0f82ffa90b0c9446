"""The plumbing every example shares: its common options, logging, start-up errors, exit status.

Not an example itself, and nothing here is threadserve's API: each example
keeps its handler and its call to ``threadserve.serve`` (or ``Server``) in its
own file, and uses these few helpers for what would otherwise be the same
twenty lines in each. The examples run as scripts
(``python examples/chat.py ...``), which puts this folder on ``sys.path``.

The exit status is that of ``threadserve serve``: 0 after a clean stop, 1 when
the server could not start, 3 when the stop had to force connections.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import threadserve

LOG_LEVELS = ["debug", "info", "warning", "error"]


def arguments(
    name: str,
    description: str,
    *,
    bind: str,
    max_connections: int | None,
    max_connections_help: str = "clients served at once",
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A parser with the options every example takes; the example adds its own.

    ``--bind`` (repeatable, ``bind`` when not given), ``--max-connections``,
    ``--grace`` and ``--log-level``.
    """
    parser = argparse.ArgumentParser(prog=f"{name}.py", description=description, epilog=epilog)
    parser.add_argument(
        "--bind",
        action="append",
        metavar="ADDR",
        help=f"HOST:PORT, [IPV6]:PORT or unix:PATH; repeat for several (default: {bind})",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=max_connections,
        metavar="N",
        help=f"{max_connections_help} (default: {max_connections or 'no limit'})",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long a stop waits for clients to finish (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    # "append" would add to a default list rather than replace it: the
    # default is filled in after parsing instead.
    parser.set_defaults(default_bind=[bind])
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` (the command line when None) and start logging to stderr at --log-level."""
    args = parser.parse_args(argv)
    args.bind = args.bind or args.default_bind
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args


@contextmanager
def start_up_errors(name: str) -> Iterator[None]:
    """Turn a ``ThreadserveError`` (an address in use, a bad setting) into status 1 and one line.

    Around making and running the server: threadserve raises these before it
    serves, and the user wants the reason, not a traceback.
    """
    try:
        yield
    except threadserve.ThreadserveError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def exit_status(report: threadserve.StopReport) -> int:
    """0 when every connection drained within the grace period, 3 when some were forced."""
    return 0 if report.clean else 3
