"""A throwaway PostgreSQL cluster for tests and benchmarks: a temporary folder, a Unix socket.

The cluster listens on no TCP address at all, only on a Unix socket in its
own folder, so nothing outside this machine (or even outside that folder)
can reach it. PostgreSQL refuses to run as root; when we are root (CI is),
initdb and the server run as the ``postgres`` user (or ``nobody``), which is
given the folder. Durability is switched off: the data is thrown away anyway.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "threadserve"
PORT = 5432  # Only names the socket file (.s.PGSQL.5432) in the cluster's folder.


class ClusterError(RuntimeError):
    """PostgreSQL is missing, or the cluster did not start."""


@dataclass(frozen=True)
class Cluster:
    folder: Path
    dsn: str


def pg_program(name: str) -> str:
    """The path of a PostgreSQL server program, on PATH or where Debian puts it."""
    found = shutil.which(name)
    if found:
        return found
    # Debian: /usr/lib/postgresql/15/bin/initdb; take the newest version.
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda path: int(Path(path).parent.parent.name))
    if candidates:
        return candidates[-1]
    raise ClusterError(f"{name} not found: install PostgreSQL (scripts/system-packages does)")


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ClusterError("running as root and there is no postgres or nobody user to run as")


def _run(command: list[str], user: pwd.struct_passwd | None, cwd: Path, timeout: float) -> None:
    result = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        user=None if user is None else user.pw_uid,
        group=None if user is None else user.pw_gid,
        extra_groups=None if user is None else [],
        env={**os.environ, "LC_ALL": "C"},
        check=False,
    )
    if result.returncode != 0:
        raise ClusterError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


@contextlib.contextmanager
def throwaway_cluster(max_connections: int = 50, **settings: str) -> Iterator[Cluster]:
    """Create, start, yield, then stop and delete a cluster; ``settings`` go to postgresql.conf."""
    user = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="threadserve-pg-"))
    data = folder / "data"
    try:
        if user is not None:
            os.chown(folder, user.pw_uid, user.pw_gid)
        _run(
            [
                pg_program("initdb"),
                "--pgdata",
                str(data),
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            user,
            folder,
            120,
        )
        config = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{folder}'",
            "port": str(PORT),
            "max_connections": str(max_connections),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **settings,
        }
        with (data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in config.items())
        pg_ctl = pg_program("pg_ctl")
        log = folder / "server.log"
        start = [pg_ctl, "--pgdata", str(data), "--log", str(log), "--wait", "start"]
        _run(start, user, folder, 120)
        try:
            yield Cluster(folder, f"host={folder} port={PORT} user={SUPERUSER} dbname=postgres")
        finally:
            # fast: roll back what runs, disconnect clients; no checkpoint to wait for.
            stop = [pg_ctl, "--pgdata", str(data), "--mode", "fast", "--wait", "stop"]
            _run(stop, user, folder, 120)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
