"""The ``threadserve`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ._admission import OverloadPolicy, default_max_connections
from ._exceptions import ConfigurationError, ThreadserveError
from ._notices import Notices
from ._server import DEFAULT_BIND, DEFAULT_GOODBYE, DEFAULT_GRACE, Handler, Server
from ._timeouts import Timeouts
from ._tls import server_tls_context
from .handlers import BUILTIN_HANDLERS

EXIT_OK = 0
EXIT_ERROR = 1  # Could not start: bad address, port in use, handler not found.
EXIT_USAGE = 2  # argparse's own code for a bad command line.
EXIT_FORCED = 3  # Stopped, but the grace period ran out and connections were forced.

DESCRIPTION = """\
Serve TCP clients with one thread per connection, running plain blocking Python code.

Ctrl-C or SIGTERM stops gracefully: new connections are refused, every client's
pending data is answered, then it gets the goodbye notice and a clean EOF. After
--grace seconds whatever is left is forced; a second Ctrl-C forces at once.
"""

EPILOG = f"""\
handlers:
  echo              send back every byte (the default)
  lines             send back each whole line (line limit 64 KiB, read timeout applies)
  discard           read and drop everything
  MODULE:CALLABLE   your own: a callable taking a threadserve.Connection

exit status:
  {EXIT_OK}  stopped cleanly (every connection drained)
  {EXIT_ERROR}  could not start (the message says why)
  {EXIT_USAGE}  bad command line
  {EXIT_FORCED}  stopped, but connections had to be forced after the grace period

example:
  threadserve serve echo --bind 127.0.0.1:8000 --bind [::1]:8000 --grace 10
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threadserve",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run a server",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "handler",
        nargs="?",
        default="echo",
        metavar="HANDLER",
        help="built-in handler name or MODULE:CALLABLE (default: echo)",
    )
    serve.add_argument(
        "--bind",
        "-b",
        action="append",
        metavar="ADDR",
        help=f"HOST:PORT, [IPV6]:PORT or unix:PATH; repeat for several (default: {DEFAULT_BIND})",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"how long a stop may take before it is forced (default: {DEFAULT_GRACE:g})",
    )
    goodbye = serve.add_mutually_exclusive_group()
    goodbye.add_argument(
        "--goodbye",
        metavar="TEXT",
        default=DEFAULT_GOODBYE.decode().rstrip("\n"),
        help="line sent to each client when the server stops (default: %(default)r)",
    )
    goodbye.add_argument(
        "--no-goodbye", action="store_true", help="send no notice on stop, only a clean EOF"
    )
    limits = serve.add_argument_group("limits (a client over a limit is told why in one line)")
    limits.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="most clients served at once (default: from the open-file limit, "
        f"{default_max_connections()} here)",
    )
    limits.add_argument(
        "--max-connections-per-ip",
        type=int,
        metavar="N",
        help="most clients served at once from one address (default: no limit)",
    )
    limits.add_argument(
        "--overload",
        choices=[policy.value for policy in OverloadPolicy],
        default=OverloadPolicy.WAIT.value,
        help="at --max-connections: 'wait' leaves new clients in the kernel queue until a "
        "connection ends; 'reject' answers them with a busy notice and closes "
        "(default: %(default)s)",
    )
    defaults = Timeouts()
    timeouts = serve.add_argument_group("timeouts (seconds; 'none' or 0 for no limit)")
    for name, help_text in (
        ("idle", "longest wait for a client's next bytes"),
        ("read", "longest time for one line or frame once it started (stops slowloris)"),
        ("write", "longest time a client may take none of our data"),
        ("handshake", "longest TLS handshake"),
        ("lifetime", "longest life of one connection"),
    ):
        flag = "--lifetime" if name == "lifetime" else f"--{name}-timeout"
        timeouts.add_argument(
            flag,
            dest=f"{name}_timeout",
            type=_seconds_or_none,
            default=getattr(defaults, name),
            metavar="S",
            help=f"{help_text} (default: {getattr(defaults, name) or 'none'})",
        )
    tls = serve.add_argument_group("TLS")
    tls.add_argument("--tls-cert", metavar="FILE", help="certificate chain (PEM); enables TLS")
    tls.add_argument("--tls-key", metavar="FILE", help="private key (PEM), if not in --tls-cert")
    tls.add_argument(
        "--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA"
    )
    serve.add_argument(
        "--no-notices",
        action="store_true",
        help="never send the busy/timeout/too-long notices (for binary protocols)",
    )
    serve.add_argument("--no-keepalive", action="store_true", help="turn off TCP keepalive probes")
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="info logs one line per connection opened and closed (default: info)",
    )
    return parser


def _seconds_or_none(text: str) -> float | None:
    if text.strip().lower() in ("none", "off", "0"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds or 'none'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive (or 'none')")
    return value


def load_handler(spec: str) -> Handler:
    """Resolve a built-in handler name or ``module:callable``."""
    if spec in BUILTIN_HANDLERS:
        return BUILTIN_HANDLERS[spec]
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        names = ", ".join(sorted(BUILTIN_HANDLERS))
        raise ConfigurationError(
            f"unknown handler {spec!r}: use a built-in ({names}) or MODULE:CALLABLE"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot load handler {spec!r}: {exc}") from exc
    except Exception as exc:  # The module itself failed: SyntaxError, NameError, ...
        raise ConfigurationError(
            f"cannot load handler {spec!r}: importing {module_name!r} raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    try:
        handler: object = module
        for part in attribute.split("."):
            handler = getattr(handler, part)
    except AttributeError as exc:
        raise ConfigurationError(
            f"cannot load handler {spec!r}: module {module_name!r} has no {attribute!r}"
        ) from exc
    if not callable(handler):
        raise ConfigurationError(f"cannot load handler {spec!r}: {attribute!r} is not callable")
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # A handler given as MODULE:CALLABLE is looked up from the current directory
    # too, as `python -m` would, even when started through the console script.
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        handler = load_handler(args.handler)
        goodbye = None if args.no_goodbye else args.goodbye + "\n"
        if args.tls_key and not args.tls_cert:
            raise ConfigurationError("--tls-key needs --tls-cert")
        if args.tls_client_ca and not args.tls_cert:
            raise ConfigurationError("--tls-client-ca needs --tls-cert")
        tls = (
            server_tls_context(args.tls_cert, args.tls_key, args.tls_client_ca)
            if args.tls_cert
            else None
        )
        server = Server(
            handler,
            args.bind or [DEFAULT_BIND],
            grace=args.grace,
            goodbye=goodbye,
            timeouts=Timeouts(
                idle=args.idle_timeout,
                read=args.read_timeout,
                write=args.write_timeout,
                handshake=args.handshake_timeout,
                lifetime=args.lifetime_timeout,
            ),
            max_connections=args.max_connections,
            max_connections_per_ip=args.max_connections_per_ip,
            overload=args.overload,
            notices=Notices.none() if args.no_notices else None,
            tls=tls,
            keepalive=not args.no_keepalive,
        )
    except ThreadserveError as exc:
        print(f"threadserve: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    with server:
        report = server.serve_forever()
    return EXIT_OK if report.clean else EXIT_FORCED


if __name__ == "__main__":
    sys.exit(main())
