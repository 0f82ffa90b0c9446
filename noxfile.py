"""Every declared Python runs the whole suite: `make test-all-pythons` (or `nox`).

One session per version, ``tests-3.10`` to ``tests-3.13``. Each installs the
package with its ``test`` extra (not editable: the installed wheel is what is
tested) into a venv of its own under ``.nox/`` and runs pytest; arguments after
``--`` go to pytest (``nox -s tests-3.12 -- tests/test_stop.py``). Without arguments, the
suites that read from sockets run a second time with the pure-Python read, and the stop
contract (tests/test_stop.py) a third time with pipes for stop descriptors, the
fallback for platforms without eventfd.

Why interpreters are found here rather than by nox: on the project's machines
the interpreters live under pyenv (``~/.pyenv/versions/3.X.Y``) and ``PATH``
holds pyenv *shims* for ``python3.10`` and friends that exist but fail unless
pyenv has that version selected. nox would take a shim, or (with its default
``download_python="auto"``) try to download an interpreter. So each version is
looked up explicitly, checked by running it, and a version that cannot be
found fails its session loudly: a declared version is never skipped.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import nox

PYTHONS = ("3.10", "3.11", "3.12", "3.13")
# The suites run again with the pure-Python read; the Makefile reads the same file.
_SUITES_FILE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "tests", "pure-python-suites"
)
with open(_SUITES_FILE) as _suites:
    PURE_PYTHON_TESTS = tuple(
        line.strip() for line in _suites if line.strip() and not line.startswith("#")
    )

nox.options.default_venv_backend = "venv"
nox.options.download_python = "never"
nox.options.error_on_missing_interpreters = True
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = [f"tests-{version}" for version in PYTHONS]


def _reports_version(candidate: str, version: str) -> bool:
    """True when `candidate` runs and is Python `version` (a pyenv shim may not run)."""
    try:
        completed = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return completed.returncode == 0 and completed.stdout.strip() == version


def _release(path: str) -> tuple[int, ...]:
    """(3, 10, 13) for ``.../versions/3.10.13/bin/python3.10``."""
    name = os.path.basename(os.path.dirname(os.path.dirname(path)))
    return tuple(int(part) if part.isdigit() else -1 for part in name.split("."))


def find_interpreter(version: str) -> str | None:
    """The path of a working Python `version`, or None.

    Looked up in this order: ``THREADSERVE_PYTHON_3_10`` (and so on) in the
    environment, pyenv's versions directory (``$PYENV_ROOT``, else
    ``~/.pyenv``, else ``/root/.pyenv``), then ``python3.X`` on ``PATH``.
    """
    candidates: list[str] = []
    override = os.environ.get("THREADSERVE_PYTHON_" + version.replace(".", "_"))
    if override:
        candidates.append(override)
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv"), "/root/.pyenv"]
    for root in dict.fromkeys(r for r in roots if r):
        # Newest patch release first (3.10.13 before 3.10.9).
        found = glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}"))
        found.sort(key=_release, reverse=True)
        candidates.extend(found)
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(on_path)
    for candidate in candidates:
        if _reports_version(candidate, version):
            return candidate
    return None


def _install_and_test(session: nox.Session) -> None:
    session.install(".[test]")
    session.run("python", "-m", "pytest", *session.posargs)
    if not session.posargs:
        # The suites that read from sockets again, with the pure-Python read
        # (what an install without a C compiler gets).
        session.run(
            "python",
            "-m",
            "pytest",
            "-q",
            *PURE_PYTHON_TESTS,
            env={"THREADSERVE_PURE_PYTHON": "1"},
        )
        # The stop contract again on the pipes used where there is no eventfd (macOS).
        session.run(
            "python",
            "-m",
            "pytest",
            "-q",
            "tests/test_stop.py",
            env={"THREADSERVE_FORCE_PIPE_BROADCAST": "1"},
        )


for _version in PYTHONS:
    _interpreter = find_interpreter(_version)
    if _interpreter is None:

        def _missing(session: nox.Session, version: str = _version) -> None:
            session.error(
                f"Python {version} not found (looked in $THREADSERVE_PYTHON_"
                f"{version.replace('.', '_')}, ~/.pyenv/versions/{version}.*, "
                f"python{version} on PATH); it is declared in pyproject.toml, so "
                "its tests must run: install it or point that variable at it"
            )

        nox.session(name=f"tests-{_version}", python=False)(_missing)
    else:
        nox.session(name=f"tests-{_version}", python=_interpreter)(_install_and_test)
