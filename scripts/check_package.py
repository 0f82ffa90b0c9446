"""Build the sdist and wheel, install the wheel in a clean venv, and serve from it.

Run by ``make check-package`` (and so by CI). Checks what a user who runs
``pip install threadserve`` gets, not the source tree:

1. ``python -m build`` makes both archives (the wheel from the sdist, so a file
   missing from the sdist fails here); a setuptools deprecation warning in its
   output (the old ``license`` table, for one) fails too.
2. A new venv, made outside the source tree, gets the wheel and nothing else.
3. That venv's ``threadserve --version`` names the built version and the
   compiled read (the wheel carries the C module), and
   ``threadserve serve echo`` on a free loopback port echoes a real client's
   bytes, and at SIGTERM sends the goodbye notice, a clean EOF, and exits 0.

Loopback only; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"serving on 127\.0\.0\.1:(\d+)$", re.MULTILINE)
WAIT = 60.0  # Generous: the machine may be busy with other work.


def fail(message: str) -> None:
    print(f"check-package: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def run(*command: str | Path, cwd: Path | None = None) -> str:
    """Run a command; fail with its output if it fails; return stdout and stderr together."""
    printable = " ".join(str(part) for part in command)
    print(f"check-package: $ {printable}", flush=True)
    completed = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )
    if completed.returncode != 0:
        fail(f"{printable} exited {completed.returncode}:\n{completed.stdout}")
    return completed.stdout


def build(out: Path) -> tuple[Path, Path]:
    output = run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    # "SetuptoolsDeprecationWarning", "... as a TOML table is deprecated": any case.
    # Not the C compiler's own warnings (a deprecated C API is not configuration).
    warnings = [
        line
        for line in output.splitlines()
        if "deprecat" in line.lower() and ".c:" not in line and "-Wdeprecated" not in line
    ]
    if warnings:
        fail("the build warns of deprecated configuration:\n" + "\n".join(warnings))
    sdists = sorted(out.glob("threadserve-*.tar.gz"))
    wheels = sorted(out.glob("threadserve-*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        fail(f"expected one sdist and one wheel in {out}, found {sorted(out.iterdir())}")
    return sdists[0], wheels[0]


def recv_until_eof(sock: socket.socket) -> bytes:
    received = bytearray()
    while chunk := sock.recv(65536):
        received += chunk
    return bytes(received)


def serve_from(venv: Path, workdir: Path) -> None:
    """Run the venv's console script and talk to it as a client would."""
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(venv / "bin" / "threadserve"), "serve", "echo", "--bind", "127.0.0.1:0"],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + WAIT
        match = None
        while match is None:
            match = SERVING.search(log_path.read_text(errors="replace"))
            if match is None:
                if server.poll() is not None or time.monotonic() > deadline:
                    fail(f"the installed server did not start:\n{log_path.read_text()}")
                time.sleep(0.05)
        port = int(match.group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
            message = b"hello from the installed wheel\n"
            client.sendall(message)
            echoed = b""
            while len(echoed) < len(message):
                chunk = client.recv(65536)
                if not chunk:
                    break
                echoed += chunk
            if echoed != message:
                fail(f"sent {message!r}, got back {echoed!r}")
            server.send_signal(signal.SIGTERM)
            rest = recv_until_eof(client)
            if rest != b"Shutting down!\n":
                fail(f"after SIGTERM expected the goodbye notice then EOF, got {rest!r}")
        code = server.wait(timeout=WAIT)
        if code != 0:
            fail(f"the server exited {code}, not 0:\n{log_path.read_text()}")
        print(f"check-package: served from the wheel on 127.0.0.1:{port}, stopped cleanly")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="threadserve-package-") as temp:
        workdir = Path(temp)
        sdist, wheel = build(workdir / "dist")
        print(f"check-package: built {sdist.name} and {wheel.name}")
        venv = workdir / "venv"
        run(sys.executable, "-m", "venv", venv)
        run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, cwd=workdir)
        # Imported from the venv's site-packages, not from this source tree.
        where = run(
            venv / "bin" / "python",
            "-c",
            "import threadserve; print(threadserve.__file__)",
            cwd=workdir,
        ).strip()
        if not where.startswith(str(venv)):
            fail(f"threadserve was imported from {where}, not from the clean venv")
        expected = wheel.name.split("-")[1]
        version = run(venv / "bin" / "threadserve", "--version", cwd=workdir).strip()
        # The wheel was built here, where gcc is: its read must be the compiled one.
        if version != f"threadserve {expected} (compiled reads)":
            fail(
                f"threadserve --version said {version!r}, "
                f"expected 'threadserve {expected} (compiled reads)'"
            )
        serve_from(venv, workdir)


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)  # Nothing of the source tree may leak in.
    main()
