"""What the examples share (examples/_run.py), tried as a new user would: from the shell.

Each example is started as ``python examples/NAME.py`` from the repository
root, as its docstring says, so these also check that an example finds its
shared helpers there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import subprocess_env

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["chat", "kv", "pg_gateway", "url_check"]


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, f"examples/{name}.py", *args],
        cwd=ROOT,
        env=subprocess_env(with_tests_dir=False),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_takes_the_common_options(name: str) -> None:
    done = run_example(name, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {name}.py ")
    for option in ("--bind ADDR", "--max-connections N", "--grace SECONDS", "--log-level"):
        assert option in done.stdout, done.stdout


@pytest.mark.parametrize("name", ["chat", "kv", "url_check"])
def test_a_bad_address_is_one_line_and_status_1(name: str, tmp_path: Path) -> None:
    extra = ["--db", str(tmp_path / "kv.sqlite3")] if name == "kv" else []
    done = run_example(name, "--bind", "nonsense", *extra)
    assert done.returncode == 1, done.stderr
    # The reason, not a traceback.
    assert done.stderr.startswith(f"{name}: error: bad bind address 'nonsense'"), done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_setting_is_one_line_and_status_1() -> None:
    done = run_example("chat", "--bind", "127.0.0.1:0", "--max-queued", "0")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("chat: error: max_queued=0"), done.stderr
