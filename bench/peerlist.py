"""The peers: which server each name runs and what it is compared on."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

from bench.build import BUILD_DIR

ECHO_WORKLOADS = frozenset({"echo", "short", "mixed", "idle", "stop"})
ALL_WORKLOADS = ECHO_WORKLOADS | {"blocking"}


@dataclass(frozen=True)
class Peer:
    name: str
    module: str | None  # `python -m` module; None for the compiled reference
    workloads: frozenset[str]
    note: str

    def command(self, port: int, workload: str, conns: int = 1000) -> list[str]:
        """The argv that serves `workload` on 127.0.0.1:`port` for `conns` connections."""
        # idle and stop measure connections held by the echo server.
        served = "blocking" if workload == "blocking" else "echo"
        if self.name == "threadserve":
            handler = "bench.handlers:blocking_echo" if served == "blocking" else "echo"
            bind = f"127.0.0.1:{port}"
            # warning: the default (info) logs a line per connection, which
            # would charge threadserve for logging the other peers do not do.
            serve = ["serve", handler, "--bind", bind, "--log-level", "warning"]
            return [sys.executable, "-m", "threadserve", *serve]
        if self.module is None:
            return [str(BUILD_DIR / "refserver"), "--port", str(port)]
        argv = [sys.executable, "-m", self.module, "--port", str(port), "--workload", served]
        if self.name == "asyncio-pool":
            # one executor thread per connection, as a careful asyncio user sizes it
            argv += ["--pool", str(max(conns, 1))]
        return argv

    def available(self) -> str | None:
        """None when the peer can run here, else the reason it cannot."""
        if self.name == "threadserve":
            if importlib.util.find_spec("threadserve") is None:
                return "threadserve is not installed"
            if importlib.util.find_spec("threadserve.__main__") is None:
                return "threadserve has no __main__ (CLI) yet"
            return None
        if self.module is None:
            return None
        root = self.module.rsplit(".", 1)[-1]
        needs = {"uvloop_protocol": "uvloop", "gevent_stream": "gevent", "trio_serve": "trio"}
        dependency = needs.get(root)
        if dependency and importlib.util.find_spec(dependency) is None:
            return f"{dependency} is not installed (pip install -e '.[bench]')"
        return None


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer(
            "threadserve",
            None,
            ALL_WORKLOADS,
            "CLI `threadserve serve echo`; blocking via bench.handlers:blocking_echo",
        ),
        Peer(
            "threads-bare",
            "bench.peers.threads_bare",
            ALL_WORKLOADS,
            "the seed's loop without its print: recv/sendall in a thread per connection, "
            "nothing else (the thread model's ceiling)",
        ),
        Peer(
            "seed",
            "bench.peers.seed",
            ALL_WORKLOADS,
            "the article's ClientEchoThread server; print kept, stdout to /dev/null",
        ),
        Peer(
            "socketserver",
            "bench.peers.socketserver_threading",
            ALL_WORKLOADS,
            "socketserver.ThreadingTCPServer, defaults (backlog 5)",
        ),
        Peer(
            "asyncio-protocol",
            "bench.peers.asyncio_protocol",
            ALL_WORKLOADS,
            "asyncio Protocol; blocking via asyncio.to_thread (default executor)",
        ),
        Peer(
            "asyncio-pool",
            "bench.peers.asyncio_pool",
            frozenset({"blocking"}),
            "asyncio Protocol; blocking via asyncio.to_thread on a ThreadPoolExecutor "
            "with one thread per connection",
        ),
        Peer(
            "asyncio-streams",
            "bench.peers.asyncio_streams",
            ALL_WORKLOADS,
            "asyncio start_server streams; blocking via asyncio.to_thread",
        ),
        Peer(
            "uvloop",
            "bench.peers.uvloop_protocol",
            ALL_WORKLOADS,
            "uvloop with the asyncio Protocol peer; blocking via asyncio.to_thread",
        ),
        Peer(
            "gevent",
            "bench.peers.gevent_stream",
            ALL_WORKLOADS,
            "gevent StreamServer after monkey.patch_all(); blocking via patched time.sleep",
        ),
        Peer(
            "trio",
            "bench.peers.trio_serve",
            ALL_WORKLOADS,
            "trio.serve_tcp; blocking via trio.to_thread.run_sync (limiter: 40 threads)",
        ),
        Peer(
            "c-epoll",
            None,
            ECHO_WORKLOADS,
            "compiled single-thread epoll echo server (bench/refserver.c): the machine's limit",
        ),
    )
}
