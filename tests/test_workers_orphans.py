"""No orphans: a worker whose supervisor dies stops too (PR_SET_PDEATHSIG, and the channel)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest
from support import SETTLE, ServerProcess, subprocess_env, wait_until

pytestmark = pytest.mark.timeout(120)

#: A parent that starts a child which asks for SIGTERM at its parent's death
#: and then sleeps, with nothing else that could end it (no channel, no pipe
#: to the parent): only the kernel's signal can stop it within the test.
PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen(
        [sys.executable, "-c", sys.argv[1]], stdin=subprocess.DEVNULL, start_new_session=True
    )
    print(child.pid, flush=True)
    time.sleep(600)
    """
)
CHILD = textwrap.dedent(
    """
    import os, sys, time
    from threadserve._worker import stop_with_parent
    if not stop_with_parent(os.getppid()):
        sys.exit(5)
    print("armed", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_stop_with_parent_sends_sigterm_when_the_parent_dies() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=subprocess_env(),
    )
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        # Armed once it has printed; its output is the parent's stdout too.
        assert parent.stdout.readline() == b"armed\n"
        parent.kill()
        parent.wait(SETTLE)
        # Not our child: psutil polls it. Killed by SIGTERM, not left sleeping.
        wait_until(lambda: not _alive(child), what="the orphan to get SIGTERM")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(SETTLE)
        if parent.stdout is not None:
            parent.stdout.close()


def test_the_workers_of_a_killed_supervisor_stop() -> None:
    with ServerProcess(["echo", "--bind", "127.0.0.1:0", "--workers", "2"]) as server:
        server.wait_for_log(r"2 workers ready")
        workers = psutil.Process(server.process.pid).children()
        assert len(workers) == 2
        os.kill(server.process.pid, signal.SIGKILL)
        assert server.wait_exit() == -signal.SIGKILL
        wait_until(
            lambda: not any(_alive(worker) for worker in workers),
            what="the workers to stop",
            state=lambda: [w.pid for w in workers if _alive(w)],
        )
        # They stopped gracefully (a SIGTERM or the channel's end, whichever came first).
        output = server.output()
        assert output.count("stopped in") == 2, output


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
