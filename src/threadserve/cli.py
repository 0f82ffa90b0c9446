"""The ``threadserve`` command line."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__, _accel
from ._admission import OverloadPolicy, default_max_connections
from ._agent import AgentResponder
from ._checks import (
    CONNECTIONS,
    IDLE_THREADS,
    INTERVAL,
    MAX_WORKERS,
    SHORT_WAIT,
    TIMEOUT,
    WORKER_CONNECTIONS,
    WORKERS,
)
from ._environ import HELP as ENVIRONMENT_HELP
from ._environ import parse_args
from ._exceptions import ConfigurationError, ThreadserveError
from ._hangup import sighup_ignored, sighup_reloads
from ._listeners import Listener, open_listeners, parse_bind_address
from ._logging import LOG_FORMATS, LOG_LEVELS, configure_logging
from ._notices import Notices
from ._pidfile import remove_pid_file, write_pid_file
from ._proxy import ProxyMode
from ._server import DEFAULT_BIND, DEFAULT_GOODBYE, DEFAULT_GRACE, Handler, Server
from ._setup import DEFAULT_PROXY_ALLOW, DEFAULT_PROXY_TIMEOUT
from ._supervisor import DEFAULT_WORKER_TIMEOUT, Supervisor, cpu_count
from ._systemd import Notifier, activated_sockets, resolve_binds
from ._threads import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_IDLE
from ._timeouts import Timeouts
from ._tls import server_tls_context
from ._upgrade import FATAL as UPGRADE_FATAL
from ._upgrade import READY as UPGRADE_READY
from ._upgrade import Handover, Predecessor, ServerUpgrade, take_handover, take_over_when_told
from ._worker import run_worker
from .handlers import BUILTIN_HANDLERS

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from ._metrics import MetricsEndpoint

logger = logging.getLogger("threadserve")

EXIT_OK = 0
EXIT_ERROR = 1  # Could not start: bad address, port in use, handler not found.
EXIT_USAGE = 2  # argparse's own code for a bad command line.
EXIT_FORCED = 3  # Stopped, but the grace period ran out and connections were forced.

DESCRIPTION = """\
Serve TCP clients with one thread per connection, running plain blocking Python code.

Ctrl-C or SIGTERM stops gracefully: new connections are refused, every client's
pending data is answered, then it gets the goodbye notice and a clean EOF. After
--grace seconds whatever is left is forced; a second Ctrl-C forces at once.
SIGUSR2 upgrades in place: a new process (same command) takes the listening
sockets over, and once it serves this one stops; its pid goes to --pid-file.
SIGHUP: in a terminal, a graceful stop (a terminal sends it when it closes);
without one (under systemd, say) a reload: one process upgrades as for
SIGUSR2, and so imports the handler afresh; with --workers new workers replace
the old. Under nohup SIGHUP stays ignored. One process with --agent-bind or
--metrics logs and ignores both SIGUSR2 and the reload.
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
  {EXIT_USAGE}  bad command line (unknown option, value out of range, options that need another)
  {EXIT_FORCED}  stopped, but connections had to be forced after the grace period

{ENVIRONMENT_HELP}
example:
  threadserve serve echo --bind 127.0.0.1:8000 --bind [::1]:8000 --grace 10
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threadserve",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__} ({_accel.reads()} reads)",
        help="show the version, and whether socket reads are compiled or pure Python, and exit",
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
        help="HOST:PORT, [IPV6]:PORT, unix:PATH, or a socket handed over: fd://N, or systemd:NAME "
        f"under socket activation; repeat for several (default: {DEFAULT_BIND})",
    )
    serve.add_argument(
        "--grace",
        type=SHORT_WAIT.parse,
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
        type=CONNECTIONS.parse,
        metavar="N",
        help="most clients served at once (default: from the open-file limit, "
        f"{default_max_connections()} here)",
    )
    limits.add_argument(
        "--max-connections-per-ip",
        type=CONNECTIONS.parse,
        metavar="N",
        help="most clients served at once from one address (default: no limit)",
    )
    limits.add_argument(
        "--idle-threads",
        type=IDLE_THREADS.parse,
        metavar="N",
        default=DEFAULT_MAX_IDLE,
        help="connection threads kept parked for the next client when their connection ends, "
        "so a new client costs no thread start; 0 ends each thread with its connection "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--idle-thread-timeout",
        type=SHORT_WAIT.parse,
        metavar="SECONDS",
        default=DEFAULT_IDLE_TIMEOUT,
        help="a parked thread that gets no client for this long ends (default: %(default)s)",
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
    balancer = serve.add_argument_group("behind a load balancer (see docs/deployment.md)")
    balancer.add_argument(
        "--proxy-protocol",
        choices=[mode.value for mode in ProxyMode],
        help="read a PROXY protocol header (v1 text, v2 binary, or any) before anything else "
        "on each connection; the client it reports becomes the peer (default: off)",
    )
    balancer.add_argument(
        "--proxy-allow",
        action="append",
        metavar="CIDR",
        help="an address or network the proxies connect from, repeat for several; "
        "connections from others are closed "
        f"(default: {' '.join(DEFAULT_PROXY_ALLOW)})",
    )
    balancer.add_argument(
        "--proxy-timeout",
        type=TIMEOUT.parse,
        default=DEFAULT_PROXY_TIMEOUT,
        metavar="S",
        help="the PROXY header must be complete within this (default: %(default)g)",
    )
    balancer.add_argument(
        "--agent-bind",
        metavar="ADDR",
        help="answer HAProxy's agent-check here: 'up ready' while serving, 'drain' while draining",
    )
    balancer.add_argument(
        "--drain-delay",
        type=SHORT_WAIT.parse,
        default=0.0,
        metavar="S",
        help="on SIGTERM or SIGINT keep serving this long while the agent says drain, "
        "then stop as usual; with --workers the supervisor answers the agent, and a SIGHUP "
        "reload drains as long too before the old workers stop (default: 0)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        type=str.lower,  # WARNING, as Python's logging spells it, or warning.
        choices=LOG_LEVELS,
        help="info logs one line per connection opened and closed; any case (default: info)",
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="json: one JSON object per line, with event, peer, duration, bytes_in, "
        "bytes_out and reason as keys (default: text)",
    )
    serve.add_argument(
        "--metrics",
        metavar="ADDR",
        help="serve Prometheus metrics at http://ADDR/metrics, ADDR being HOST:PORT; with "
        "--workers the supervisor serves the sums over every worker "
        "(needs pip install 'threadserve[metrics]'; default: off)",
    )
    _add_worker_options(serve)
    return parser


def _add_worker_options(serve: argparse.ArgumentParser) -> None:
    workers = serve.add_argument_group(
        "worker processes (SIGHUP reloads with no client lost, or stops when started in a "
        "terminal; SIGTTIN/SIGTTOU add or remove one; SIGUSR2 upgrades the supervisor itself: "
        "a new one takes over, its pid in --pid-file)"
    )
    workers.add_argument(
        "--workers",
        type=_worker_count,
        metavar="N|auto",
        help=f"serve from N processes under a supervisor, N at most {MAX_WORKERS} ('auto': "
        "one per CPU this process may use); without it, one process serves",
    )
    workers.add_argument(
        "--worker-timeout",
        type=INTERVAL.parse,
        default=DEFAULT_WORKER_TIMEOUT,
        metavar="S",
        help="a worker silent this long is killed (its stacks logged first) and replaced "
        "(default: %(default)g)",
    )
    workers.add_argument(
        "--max-worker-connections",
        type=WORKER_CONNECTIONS.parse,
        metavar="N",
        help="replace a worker after about N connections (plus up to 10%% jitter), its "
        "replacement ready first; for handlers using leaky libraries (default: 0, never)",
    )
    workers.add_argument(
        "--reuse-port",
        action="store_true",
        help="give each worker its own SO_REUSEPORT listener instead of one shared queue",
    )
    workers.add_argument(
        "--pid-file",
        metavar="FILE",
        help="write the pid to signal here, kept right across SIGUSR2 upgrades, removed at "
        "exit (works without --workers too)",
    )
    # Set by the supervisor on its workers' command lines only.
    serve.add_argument("--worker-control", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-supervisor", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-listen", action="append", default=[], help=argparse.SUPPRESS)


def _worker_count(text: str) -> int:
    if text.strip().lower() == "auto":
        return min(cpu_count(), MAX_WORKERS)
    try:
        return WORKERS.parse(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or 'auto')") from None


def _seconds_or_none(text: str) -> float | None:
    """A per-connection timeout: seconds, or 'none' (also 'off' or 0) for no limit."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds or 'none'") from None
    if value == 0:
        return None
    if not TIMEOUT.holds(value):
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be {TIMEOUT.describe()} (or 'none' for no limit)"
        )
    return value


def _conflict(args: argparse.Namespace) -> str | None:
    """What is wrong with this combination of options, if anything."""
    for option, needs in (
        ("tls_key", "tls_cert"),
        ("tls_client_ca", "tls_cert"),
        ("proxy_allow", "proxy_protocol"),
    ):
        if getattr(args, option) and not getattr(args, needs):
            return f"--{option.replace('_', '-')} needs --{needs.replace('_', '-')}"
    # Port 0 is a fresh free port each time it is bound, so it may repeat.
    binds = [address for address in args.bind or [] if not address.endswith(":0")]
    for address in binds:
        if binds.count(address) > 1:
            return f"--bind {address} is given twice"
    if args.agent_bind and args.agent_bind in binds:
        return f"--agent-bind {args.agent_bind} is also a --bind address"
    return None


def _warn_of_worker_options(args: argparse.Namespace) -> None:
    """One process serves: say so if options that only workers use were given."""
    unused = [
        flag
        for flag, given in (
            ("--reuse-port", args.reuse_port),
            ("--worker-timeout", args.worker_timeout != DEFAULT_WORKER_TIMEOUT),
            ("--max-worker-connections", bool(args.max_worker_connections)),
        )
        if given
    ]
    if unused:
        logger.warning("%s: used only with --workers; one process serves", ", ".join(unused))


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
    except SystemExit as exc:
        # Say so: a module that parses sys.argv at import exits with its own
        # usage message, and a status of 0 would look like a clean stop.
        raise ConfigurationError(
            f"cannot load handler {spec!r}: importing {module_name!r} called sys.exit({exc.code!r})"
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parse_args(parser, argv, os.environ)
    problem = _conflict(args)
    if problem:
        parser.error(problem)  # Exits with EXIT_USAGE.
    worker_control = getattr(args, "worker_control", None)
    configure_logging(
        args.log_level, args.log_format, worker=None if worker_control is None else os.getpid()
    )
    # A handler given as MODULE:CALLABLE is looked up from the current directory
    # too, as `python -m` would, even when started through the console script.
    if "" not in sys.path:
        sys.path.insert(0, "")
    if args.worker_control is not None:
        return _run_worker(args)
    try:
        # An upgrade's successor (SIGUSR2, or one process's SIGHUP): the old one's sockets.
        handover = take_handover()
        # systemd socket activation: --bind fd://N, --bind systemd:NAME, or no
        # --bind at all; the variables are cleared so children do not take them.
        activated = activated_sockets()
        bind = [] if handover else resolve_binds(args.bind, activated) or [DEFAULT_BIND]
        if args.workers is not None or (handover is not None and handover.workers):
            return _run_supervisor(args, argv, bind, handover)
        _warn_of_worker_options(args)
        # One process; or the successor of one (SIGUSR2 or SIGHUP), on its sockets.
        predecessor = None if handover is None else Predecessor(handover)
        if handover is not None:
            listeners = handover.listeners()
        else:
            listeners = open_listeners([parse_bind_address(spec) for spec in bind])
        if predecessor is not None:
            take_over_when_told(predecessor, listeners)
        notifier = Notifier()
        upgrade: list[ServerUpgrade] = []  # Set once serving (see _upgrade_on_signals).

        def serving() -> None:
            notifier.ready(f"serving on {', '.join(server.addresses)}")
            if predecessor is not None:
                predecessor.send(UPGRADE_READY)

        def stopping() -> None:
            if not (upgrade and upgrade[0].handed_over):  # Else no longer systemd's main process.
                notifier.stopping("stopping")

        server: Server
        try:
            registry = _metrics_registry() if args.metrics else None
            server = build_server(
                args,
                listeners,
                # READY=1 only once the signal handlers are in place: a service
                # manager may send SIGTERM the moment it reads it.
                on_serving=serving,
                on_stop_accepting=stopping,
                metrics=registry,
            )
        except ThreadserveError as exc:
            for listener in listeners:
                listener.close()
            if predecessor is not None:
                predecessor.send(UPGRADE_FATAL + str(exc).encode(errors="replace"))
            raise
        endpoint = _metrics_endpoint(args.metrics, registry, server) if registry else None
        if args.pid_file and predecessor is None:
            try:
                write_pid_file(args.pid_file, os.getpid())
            except ThreadserveError:
                if endpoint is not None:
                    endpoint.close()
                server.stop()
                raise
    except ThreadserveError as exc:
        print(f"threadserve: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    with server, _upgrade_on_signals(args, argv, server, listeners, notifier, upgrade):
        notifier.start_watchdog()
        try:
            report = server.serve_forever()
        finally:
            notifier.close()
            if endpoint is not None:
                endpoint.close()
            if args.pid_file:
                remove_pid_file(args.pid_file, os.getpid())
    if upgrade and upgrade[0].handed_over:
        assert upgrade[0].successor is not None
        logger.info("process %d exits: process %d serves on", os.getpid(), upgrade[0].successor.pid)
    return EXIT_OK if report.clean else EXIT_FORCED


@contextlib.contextmanager
def _upgrade_on_signals(
    args: argparse.Namespace,
    argv: list[str],
    server: Server,
    listeners: list[Listener],
    notifier: Notifier,
    upgrade: list[ServerUpgrade],
) -> Iterator[None]:
    """One process: SIGUSR2 upgrades it in place, SIGHUP reloads it (see _upgrade.ServerUpgrade).

    A successor process takes the listening sockets over and this one stops
    once it serves. SIGHUP only where it means reload (no controlling
    terminal, not ignored: see _hangup.py); in a terminal the server's own
    handling makes it a graceful stop. With --agent-bind or --metrics, whose
    sockets are this process's own, both are logged and ignored instead:
    their default action would end the server.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if args.agent_bind or args.metrics:
        reload: Any = _log_cannot_upgrade
    else:
        upgrade.append(
            ServerUpgrade(
                server,
                listeners,
                [sys.executable, "-m", "threadserve", *argv],
                {**os.environ, **notifier.environment()},
                notifier=notifier,
                pid_file=args.pid_file,
            )
        )
        reload = upgrade[0].request
    signums = [signal.SIGUSR2, *([signal.SIGHUP] if sighup_reloads() else [])]
    previous = {signum: signal.signal(signum, reload) for signum in signums}
    try:
        yield
    finally:
        # The server has stopped and put back SIGINT's and SIGTERM's handlers.
        # Until the upgrade thread has ended (close() may wait for a successor
        # to exit), every signal that would end this process is logged and
        # not acted on: ending here would leave that successor's fate undecided.
        exiting = [signal.SIGUSR2, signal.SIGINT, signal.SIGTERM]
        if not sighup_ignored():
            exiting.append(signal.SIGHUP)
        at_exit = {signum: signal.signal(signum, _log_ignored_at_exit) for signum in exiting}
        if upgrade:
            upgrade[0].close()
        for signum, old in {**at_exit, **previous}.items():
            signal.signal(signum, signal.SIG_DFL if old is None else old)


def _log_cannot_upgrade(signum: int, frame: object) -> None:
    # Logs from the handler as _signals.py does: logging's locks are
    # reentrant, so the main thread being inside logging here cannot deadlock.
    logger.warning(
        "%s ignored: with --agent-bind or --metrics one process cannot be upgraded or reloaded "
        "in place; serve with --workers N (its supervisor hands those sockets over too)",
        signal.Signals(signum).name,
    )


def _log_ignored_at_exit(signum: int, frame: object) -> None:
    logger.info("%s ignored: exiting", signal.Signals(signum).name)


def _metrics_registry() -> CollectorRegistry:
    """prometheus-client's default registry (with its process and GC metrics)."""
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        raise ConfigurationError(
            "--metrics needs prometheus-client: pip install 'threadserve[metrics]'"
        ) from None
    return REGISTRY


def _metrics_endpoint(address: str, registry: CollectorRegistry, server: Server) -> MetricsEndpoint:
    """Serve ``/metrics``; on failure release the server, which is bound but not serving."""
    from ._metrics import MetricsEndpoint

    try:
        endpoint = MetricsEndpoint(address, registry)
    except ThreadserveError:
        server.stop()
        raise
    logger.info("metrics on %s", endpoint.url)
    return endpoint


def build_server(args: argparse.Namespace, bind: Sequence[str | Listener], **extra: Any) -> Server:
    """The Server the command line describes (handler loaded, TLS set up), listening on ``bind``.

    ``extra`` are further Server arguments (a worker's, say).
    """
    handler = load_handler(args.handler)
    goodbye = None if args.no_goodbye else args.goodbye + "\n"
    tls = (
        server_tls_context(args.tls_cert, args.tls_key, args.tls_client_ca)
        if args.tls_cert
        else None
    )
    return Server(
        handler,
        bind,
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
        proxy_protocol=args.proxy_protocol,
        proxy_allow=args.proxy_allow,
        proxy_timeout=args.proxy_timeout,
        agent_bind=args.agent_bind,
        drain_delay=args.drain_delay,
        idle_threads=args.idle_threads,
        idle_thread_timeout=args.idle_thread_timeout,
        **extra,
    )


def _run_supervisor(
    args: argparse.Namespace, argv: list[str], bind: list[str], handover: Handover | None
) -> int:
    """Bind here, then serve from ``args.workers`` processes (see _supervisor.py).

    ``handover``: this process is an upgrade's successor; it binds nothing
    and serves the old supervisor's sockets with as many workers as it had.
    """
    predecessor = None
    if handover is not None:
        listeners = handover.listeners()
        predecessor = Predecessor(handover)
        args.workers = handover.workers
    else:
        listeners = open_listeners(
            [parse_bind_address(spec) for spec in bind], reuse_port=args.reuse_port
        )
    agent: AgentResponder | None = None
    endpoint: MetricsEndpoint | None = None
    try:
        # Bound here, before any worker starts, so a bad address fails at once;
        # or inherited from the supervisor this one takes over from.
        if args.agent_bind:
            inherited = handover.agent if handover is not None else ()
            agent = AgentResponder(
                args.agent_bind,
                listeners=[Listener.inherit(fd) for fd in inherited] if inherited else None,
            )
            logger.info("agent-check answered on %s (by the supervisor)", agent.addresses[0])
        registry = _metrics_registry() if args.metrics else None
        if registry is not None:
            from ._metrics import MetricsEndpoint

            fd = handover.metrics if handover is not None else None
            endpoint = MetricsEndpoint(
                args.metrics,
                registry,
                sock=None if fd is None else socket.socket(fileno=fd),
                start=False,  # The supervisor starts it (a successor once it has taken over).
            )
            logger.info("metrics on %s (the sums over every worker)", endpoint.url)
    except BaseException:
        if endpoint is not None:
            endpoint.close()
        if agent is not None:
            agent.close()
        for listener in listeners:
            listener.close()
        raise
    supervisor = Supervisor(
        # The workers run this same command line; the options that make a
        # supervisor are ignored there (--worker-control wins).
        [sys.executable, "-m", "threadserve", *argv],
        listeners,
        args.workers,
        reuse_port=args.reuse_port,
        worker_timeout=args.worker_timeout,
        grace=args.grace,
        goodbye=None if args.no_goodbye or args.tls_cert else (args.goodbye + "\n").encode(),
        notifier=Notifier(),
        predecessor=predecessor,
        pid_file=args.pid_file,
        agent=agent,
        drain_delay=args.drain_delay,
        metrics=endpoint,
    )
    if registry is not None:
        from ._metrics import SupervisorCollector

        registry.register(SupervisorCollector(supervisor))
    logger.info(
        "supervisor %d: %d workers on %s%s",
        os.getpid(),
        args.workers,
        ", ".join(supervisor.addresses),
        f" (upgrade: taking over from supervisor {predecessor.pid})" if predecessor else "",
    )
    return supervisor.run()  # It closes the agent and the metrics endpoint.


def _run_worker(args: argparse.Namespace) -> int:
    """This process is one of a supervisor's workers (see _worker.py)."""
    # The supervisor answers the agent, drains and serves the metrics; a
    # worker runs the same command line but does none of these itself.
    args.agent_bind = None
    args.drain_delay = 0.0
    listeners: list[str | Listener] = []
    try:
        for spec in args.worker_listen:
            fd, _sep, own = spec.partition(":")
            # Its own SO_REUSEPORT listener may be bound only: run_worker
            # starts it listening once the server accepts.
            owned = own == "own"
            listeners.append(Listener.inherit(int(fd), owns_queue=owned, bound_only=owned))
    except ThreadserveError as exc:
        print(f"threadserve: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return run_worker(
        args.worker_control,
        lambda on_serving, on_stop_accepting: build_server(
            args, listeners, on_serving=on_serving, on_stop_accepting=on_stop_accepting
        ),
        beat_interval=min(1.0, args.worker_timeout / 4),
        max_connections=args.max_worker_connections,
        supervisor=args.worker_supervisor,
        listeners=[item for item in listeners if isinstance(item, Listener)],
    )


if __name__ == "__main__":
    sys.exit(main())
