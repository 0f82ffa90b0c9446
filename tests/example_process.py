"""Run an example (examples/NAME.py) in its own process, as a user runs it."""

from __future__ import annotations

import sys
from pathlib import Path

from support import ServerProcess, subprocess_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# ServerProcess runs COMMAND serve ARGS (made for `threadserve serve`); this
# command runs the example file given after it with ARGS, dropping "serve".
_RUN_EXAMPLE = (
    "import runpy, sys; path = sys.argv[1]; sys.argv[:3] = [path];"
    " runpy.run_path(path, run_name='__main__')"
)


def example_process(name: str, *args: str) -> ServerProcess:
    """``python examples/NAME.py ARGS`` in a subprocess; wait for it with ``wait_serving``."""
    return ServerProcess(
        args,
        command=[sys.executable, "-c", _RUN_EXAMPLE, str(EXAMPLES / f"{name}.py")],
        env=subprocess_env(),
    )
