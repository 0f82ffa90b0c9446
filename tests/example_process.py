"""Run an example (examples/NAME.py) in its own process, as a user runs it."""

from __future__ import annotations

import sys
from pathlib import Path

from support import ServerProcess, subprocess_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# ServerProcess runs COMMAND serve ARGS (made for `threadserve serve`); this
# command runs the example file given after it with ARGS, dropping "serve",
# with the example's folder first on sys.path as `python examples/NAME.py`
# has it (the examples import their shared helpers from there).
_RUN_EXAMPLE = (
    "import os, runpy, sys; path = sys.argv[1]; sys.argv[:3] = [path];"
    " sys.path.insert(0, os.path.dirname(path)); runpy.run_path(path, run_name='__main__')"
)


def example_process(name: str, *args: str) -> ServerProcess:
    """``python examples/NAME.py ARGS`` in a subprocess; wait for it with ``wait_serving``."""
    return ServerProcess(
        args,
        command=[sys.executable, "-c", _RUN_EXAMPLE, str(EXAMPLES / f"{name}.py")],
        env=subprocess_env(),
    )
