"""Run a command as a child subreaper, for the upgrade tests: ``python upgrade_reaper.py CMD...``.

A supervisor that upgrades (SIGUSR2) starts its successor as a child and
then exits, so the successor would be re-parented to init and the test
could not see how it exits. This process marks itself a child subreaper
(Linux's PR_SET_CHILD_SUBREAPER): orphans below it become its children
instead. It waits for every one, writes ``reaped PID STATUS`` to stderr
for each (STATUS as subprocess reports it: negative for a signal), and
exits once none is left, with the status of the last one reaped. So its
own exit means that no process of the tree is left.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(command: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"reaper: prctl failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 125
    # Not waited through Popen: os.waitpid below reaps it with the orphans.
    subprocess.Popen(command, stdin=subprocess.DEVNULL)
    last = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return last
        last = os.waitstatus_to_exitcode(status)
        # One write for the whole line: the servers below write to the same
        # file, and print() may write the text and its newline apart.
        os.write(sys.stderr.fileno(), f"reaped {pid} {last}\n".encode())


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.exit(code if code >= 0 else 128 - code)
