"""What the results depend on, recorded next to them."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.build import CFLAGS, compiler_version

_SYSCTLS = {
    "somaxconn": "/proc/sys/net/core/somaxconn",
    "pid_max": "/proc/sys/kernel/pid_max",
    "threads_max": "/proc/sys/kernel/threads-max",
    "max_map_count": "/proc/sys/vm/max_map_count",
    "tcp_tw_reuse": "/proc/sys/net/ipv4/tcp_tw_reuse",
    "ip_local_port_range": "/proc/sys/net/ipv4/ip_local_port_range",
    "file_max": "/proc/sys/fs/file-max",
}

_PACKAGES = ("threadserve", "uvloop", "gevent", "trio", "psutil", "matplotlib")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cpu_model() -> str:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git_commit(root: Path) -> str | None:
    if shutil.which("git") is None:
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(root: Path) -> dict[str, Any]:
    """Describe the machine, the interpreter, the limits and the versions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    uname = platform.uname()
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "kernel": f"{uname.system} {uname.release}",
        "machine": uname.machine,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": sorted(os.sched_getaffinity(0)),
        "rlimit_nofile": {"soft": soft, "hard": hard},
        "sysctl": {name: _read(path) for name, path in _SYSCTLS.items()},
        "memory_total_kib": _meminfo_total(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "compiler": compiler_version(),
        "cflags": CFLAGS,
        "git_commit": _git_commit(root),
    }


def _meminfo_total() -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return None
