"""Compile the C load generator and reference server into bench/build/.

Rebuilds when a source is newer than its binary, so `python -m bench` is the
only command anyone needs. bench/build/ is git-ignored.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BUILD_DIR = BENCH_DIR / "build"
SOURCES = {"loadgen": BENCH_DIR / "loadgen.c", "refserver": BENCH_DIR / "refserver.c"}
# -O2 is what a distribution would ship; -march=native is left out on purpose
# so the reference numbers do not depend on which CPU built the binary.
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"]


class BuildError(RuntimeError):
    """gcc is missing or a source did not compile."""


def compiler() -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BuildError("no C compiler: install gcc (the load generator is written in C)")
    return cc


def compiler_version() -> str:
    try:
        out = subprocess.run(
            [compiler(), "--version"], capture_output=True, text=True, check=True, timeout=30
        )
    except (BuildError, OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def build_all(force: bool = False) -> dict[str, Path]:
    """Build every binary that is missing or stale; return name -> path."""
    BUILD_DIR.mkdir(exist_ok=True)
    built: dict[str, Path] = {}
    for name, source in SOURCES.items():
        target = BUILD_DIR / name
        stale = not target.exists() or target.stat().st_mtime < source.stat().st_mtime
        if force or stale:
            result = subprocess.run(
                [compiler(), *CFLAGS, "-o", str(target), str(source)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode != 0:
                raise BuildError(f"compiling {source.name} failed:\n{result.stderr}")
        built[name] = target
    return built
