"""A replacement worker that cannot start is tried again with a back-off, not given up."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
from support import ServerProcess, connect, recv_exactly, subprocess_env, wait_until

pytestmark = pytest.mark.timeout(120)

#: A handler module that cannot be imported while a file named FAIL sits beside it.
FLAKY = """
from pathlib import Path

from threadserve import echo

if (Path(__file__).parent / "FAIL").exists():
    raise RuntimeError("FAIL is there")

handler = echo
"""


def live_workers(server: ServerProcess) -> set[int]:
    try:
        children = psutil.Process(server.process.pid).children()
    except psutil.NoSuchProcess:
        return set()
    return {child.pid for child in children if child.status() != psutil.STATUS_ZOMBIE}


def test_a_replacement_that_cannot_start_is_retried_until_it_can(tmp_path: Path) -> None:
    (tmp_path / "flaky_handler.py").write_text(FLAKY)
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    with ServerProcess(
        ["flaky_handler:handler", "--bind", "127.0.0.1:0", "--workers", "2"], env=env
    ) as server:
        port = int(server.wait_for_log(r"2 workers ready, serving on 127\.0\.0\.1:(\d+)$").group(1))
        (tmp_path / "FAIL").touch()
        victim = min(live_workers(server))
        os.kill(victim, signal.SIGKILL)
        # Its replacement fails to import the handler: tried again, later and later.
        server.wait_for_log(r"trying to start a worker again in 0\.5 s")
        server.wait_for_log(r"trying to start a worker again in 1\.0 s")
        assert "FAIL is there" in server.output()
        # The other worker serves on meanwhile, and the supervisor does not give up.
        with connect(("127.0.0.1", port)) as client:
            client.sendall(b"still here\n")
            assert recv_exactly(client, 11) == b"still here\n"
        assert not server.exited.is_set()
        (tmp_path / "FAIL").unlink()
        wait_until(
            lambda: server.output().count(" ready\n") >= 3 and len(live_workers(server)) == 2,
            what="a replacement to start once it can",
            state=server.output,
        )
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.output()
