"""The command line as a user runs it: a real process, real sockets, real Ctrl-C."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import (
    NOTICE,
    TESTS_DIR,
    ServerProcess,
    connect,
    recv_exactly,
    recv_until_eof,
    server_process,
    subprocess_env,
)

pytestmark = pytest.mark.timeout(60)

PYTHON_M = [sys.executable, "-m", "threadserve"]
#: The console script pip installed next to this interpreter (the venv's bin).
CONSOLE_SCRIPT = Path(sys.executable).parent / "threadserve"


def console_script() -> list[str]:
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"threadserve is not installed as a console script ({CONSOLE_SCRIPT})")
    return [str(CONSOLE_SCRIPT)]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m threadserve ARGS`` to completion (it is expected to exit by itself)."""
    return subprocess.run(
        [*PYTHON_M, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=20,
    )


@pytest.mark.parametrize("launcher", ["python -m", "console script"])
def test_echo_then_ctrl_c_sends_notice_then_eof_and_exits_0(launcher: str) -> None:
    command = PYTHON_M if launcher == "python -m" else console_script()
    # No HANDLER argument: echo is the default.
    with server_process("--bind", "127.0.0.1:0", command=command) as (server, address):
        with connect(address) as client:
            client.sendall(b"hello, world\n")
            assert recv_exactly(client, 13) == b"hello, world\n"
            server.send_signal(signal.SIGINT)
            assert recv_until_eof(client) == NOTICE
        assert server.wait_exit() == 0, server.output()
        output = server.output()
    assert "SIGINT received: stopping gracefully" in output
    assert re.search(r"stopped in [\d.]+ s: 1 drained, 0 forced", output)
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(["--no-goodbye"], b"", id="no-goodbye"),
        pytest.param(["--goodbye", "Bye"], b"Bye\n", id="goodbye-Bye"),
    ],
)
def test_goodbye_options(options: list[str], expected: bytes) -> None:
    with server_process("echo", "--bind", "127.0.0.1:0", *options) as (server, address):
        with connect(address) as client:
            client.sendall(b"ping\n")
            assert recv_exactly(client, 5) == b"ping\n"
            server.send_signal(signal.SIGINT)
            # recv_until_eof raises on a reset: a clean EOF is part of the contract.
            assert recv_until_eof(client) == expected
        assert server.wait_exit() == 0, server.output()


def test_console_script_finds_a_handler_module_in_the_current_directory() -> None:
    # A user runs `threadserve serve mymodule:handler` next to mymodule.py,
    # with nothing on PYTHONPATH, as `python -m` would allow.
    with ServerProcess(
        ["subprocess_handlers:hold_until_stop", "--bind", "127.0.0.1:0"],
        command=console_script(),
        cwd=TESTS_DIR,
        env=subprocess_env(with_tests_dir=False),
    ) as server:
        address = server.wait_serving()
        with connect(address) as client:
            client.sendall(b"line\n")
            assert recv_exactly(client, 5) == b"line\n"
            server.send_signal(signal.SIGTERM)
            assert recv_until_eof(client) == NOTICE
        assert server.wait_exit() == 0, server.output()


def assert_clear_startup_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 1, one line on stderr saying what is wrong, and no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [result.stderr.rstrip("\n")], result.stderr
    assert result.stderr.startswith("threadserve: error: "), result.stderr
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--bind", "nonsense"], "bad bind address 'nonsense': no port", id="no-port"),
        pytest.param(
            ["--bind", "127.0.0.1:99999"],
            "bad bind address '127.0.0.1:99999': port must be a number from 0 to 65535",
            id="port-out-of-range",
        ),
        pytest.param(
            ["nosuchmodule:handler", "--bind", "127.0.0.1:0"],
            "cannot load handler 'nosuchmodule:handler': No module named 'nosuchmodule'",
            id="module-not-found",
        ),
        pytest.param(
            ["subprocess_handlers:no_such_handler", "--bind", "127.0.0.1:0"],
            "module 'subprocess_handlers' has no 'no_such_handler'",
            id="no-such-attribute",
        ),
        pytest.param(
            ["subprocess_handlers:NOT_A_HANDLER", "--bind", "127.0.0.1:0"],
            "'NOT_A_HANDLER' is not callable",
            id="not-callable",
        ),
        pytest.param(
            ["nosuchbuiltin", "--bind", "127.0.0.1:0"],
            "unknown handler 'nosuchbuiltin': use a built-in (",
            id="unknown-builtin",
        ),
        pytest.param(
            ["--grace", "-1", "--bind", "127.0.0.1:0"],
            "grace=-1.0: must be a number of seconds",
            id="negative-grace",
        ),
    ],
)
def test_startup_errors_say_what_is_wrong(args: list[str], message: str) -> None:
    assert_clear_startup_error(run_cli("serve", *args), message)


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--bind", f"127.0.0.1:{port}")
    assert_clear_startup_error(result, f"cannot listen on 127.0.0.1:{port}: address already in use")


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["serve", "--grace", "soon"], id="grace-not-a-number"),
        pytest.param(["serve", "--goodbye", "Bye", "--no-goodbye"], id="goodbye-conflict"),
        pytest.param(["serve", "--log-level", "loud"], id="bad-log-level"),
        pytest.param(["serve", "--no-such-option"], id="unknown-option"),
        pytest.param([], id="no-command"),
    ],
)
def test_bad_command_line_exits_2_with_usage(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "usage: threadserve" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_explains_handlers_exit_codes_and_stopping() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    # Handlers: the built-ins and how to name your own.
    assert re.search(r"^\s+echo\s+\S", text, re.MULTILINE)
    assert re.search(r"^\s+discard\s+\S", text, re.MULTILINE)
    assert "MODULE:CALLABLE" in text
    # Every exit status, each with its meaning.
    for status, meaning in [(0, "clean"), (1, "could not start"), (2, "bad"), (3, "forced")]:
        assert re.search(rf"^\s+{status}\s+.*{meaning}", text, re.MULTILINE), (status, text)
    # The stop: graceful on Ctrl-C/SIGTERM, a goodbye and EOF, grace, a second Ctrl-C forces.
    flat = " ".join(text.split())
    for phrase in ["Ctrl-C or SIGTERM stops gracefully", "goodbye", "--grace", "second Ctrl-C"]:
        assert phrase in flat, phrase

    top = run_cli("--help")
    assert top.returncode == 0, top.stderr
    assert "serve" in top.stdout
