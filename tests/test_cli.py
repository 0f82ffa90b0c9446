"""The command line as a user runs it: a real process, real sockets, real Ctrl-C."""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import (
    NOTICE,
    SETTLE,
    TESTS_DIR,
    ServerProcess,
    connect,
    recv_exactly,
    recv_until_eof,
    server_process,
    subprocess_env,
)

import threadserve
from threadserve import _accel, cli
from threadserve._environ import parse_args as cli_parse_args
from threadserve._environ import variable_name
from threadserve.cli import build_parser

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
        timeout=SETTLE,
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
            ["--agent-bind", "nonsense", "--bind", "127.0.0.1:0"],
            "agent-check address (--agent-bind): bad bind address 'nonsense': no port",
            id="bad-agent-address",
        ),
        pytest.param(
            ["subprocess_handlers_exit:handle", "--bind", "127.0.0.1:0"],
            "importing 'subprocess_handlers_exit' called sys.exit(0)",
            id="module-exits-at-import",
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


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        # Above what poll() can wait (2**31 - 1 ms): every connection failed.
        ("--lifetime", "2592000"),
        ("--idle-timeout", "1e308"),
        ("--read-timeout", "inf"),
        ("--write-timeout", "nan"),
        ("--proxy-timeout", "inf"),
        ("--proxy-timeout", "0"),
        # With --workers these reached the supervisor unchecked: a drain of inf
        # or NaN never ended, a NaN worker timeout crashed it, 0 killed every worker.
        ("--drain-delay", "inf"),
        ("--drain-delay", "nan"),
        ("--drain-delay", "-1"),
        ("--worker-timeout", "nan"),
        ("--worker-timeout", "0"),
        ("--worker-timeout", "-5"),
        # -1 replaced the worker every second, forever.
        ("--max-worker-connections", "-1"),
        ("--grace", "-1"),
        ("--grace", "1e9"),
        ("--idle-thread-timeout", "nan"),
        ("--max-connections", "0"),
        ("--max-connections-per-ip", "-2"),
        ("--idle-threads", "-1"),
        # Each worker is a process: a typo of a count forked until memory ran out.
        ("--workers", "40000"),
    ],
)
def test_a_value_out_of_range_is_a_usage_error_naming_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse([flag, value, "--workers", "1"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}: '{value}': must be " in error, error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--proxy-allow", "10.0.0.0/8"], "--proxy-allow needs --proxy-protocol"),
        (["--tls-key", "key.pem"], "--tls-key needs --tls-cert"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert"),
        (["--bind", "127.0.0.1:9", "--bind", "127.0.0.1:9"], "--bind 127.0.0.1:9 is given twice"),
        (
            ["--bind", "127.0.0.1:9", "--agent-bind", "127.0.0.1:9"],
            "--agent-bind 127.0.0.1:9 is also a --bind address",
        ),
    ],
)
def test_options_that_do_not_go_together_are_named(args: list[str], message: str) -> None:
    assert cli._conflict(parse(args)) == message


def test_options_that_do_not_go_together_are_a_usage_error() -> None:
    result = run_cli("serve", "--tls-key", "key.pem", "--bind", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    assert "threadserve: error: --tls-key needs --tls-cert" in result.stderr


def test_ports_chosen_by_the_kernel_may_repeat() -> None:
    # Port 0 binds a fresh free port each time: not the same address twice.
    args = ["--bind", "127.0.0.1:0", "--bind", "127.0.0.1:0", "--agent-bind", "127.0.0.1:0"]
    assert cli._conflict(parse(args)) is None


def test_worker_options_without_workers_are_reported_as_unused() -> None:
    args = ("--reuse-port", "--max-worker-connections", "100", "--bind", "127.0.0.1:0")
    with server_process(*args) as (server, _address):
        server.wait_for_log(
            r"--reuse-port, --max-worker-connections: used only with --workers; one process serves"
        )
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.output()


@pytest.mark.parametrize("value", ["0", "0.0", "none", "off"])
def test_a_timeout_of_zero_or_none_means_no_limit(value: str) -> None:
    assert parse(["--idle-timeout", value]).idle_timeout is None


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


# ------------------------------------------------- habits: version, case, environment


def parse(argv: list[str], **environ: str) -> argparse.Namespace:
    """The command line as main() reads it, with ``environ`` as the whole environment."""
    return cli_parse_args(build_parser(), ["serve", *argv], environ)


def test_version_prints_the_package_version_and_how_it_reads() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    # The CLI runs in a subprocess that inherits this environment, and so reads as we do.
    reads = _accel.reads()
    assert result.stdout.strip() == f"threadserve {threadserve.__version__} ({reads} reads)"


@pytest.mark.parametrize("spelling", ["WARNING", "warning", "Warning"])
def test_log_level_takes_any_case(spelling: str) -> None:
    assert parse(["--log-level", spelling]).log_level == "warning"
    assert parse([], THREADSERVE_LOG_LEVEL=spelling).log_level == "warning"


def test_upper_case_log_level_runs_a_server() -> None:
    # DEBUG, so the "serving on" line the helper waits for is logged.
    with server_process("--bind", "127.0.0.1:0", "--log-level", "DEBUG") as (server, address):
        with connect(address) as client:
            client.sendall(b"hi\n")
            assert recv_exactly(client, 3) == b"hi\n"
            server.send_signal(signal.SIGTERM)
            assert recv_until_eof(client) == NOTICE
        assert server.wait_exit() == 0, server.output()


@pytest.mark.parametrize(
    ("variable", "value", "dest", "expected"),
    [
        pytest.param("THREADSERVE_GRACE", "7.5", "grace", 7.5, id="float"),
        pytest.param("THREADSERVE_HANDLER", "discard", "handler", "discard", id="positional"),
        pytest.param(
            "THREADSERVE_BIND",
            "127.0.0.1:9000, [::1]:9000",
            "bind",
            ["127.0.0.1:9000", "[::1]:9000"],
            id="repeatable",
        ),
        pytest.param("THREADSERVE_MAX_CONNECTIONS_PER_IP", "4", "max_connections_per_ip", 4),
        pytest.param("THREADSERVE_OVERLOAD", "reject", "overload", "reject", id="choice"),
        pytest.param("THREADSERVE_IDLE_TIMEOUT", "none", "idle_timeout", None, id="seconds"),
        pytest.param("THREADSERVE_NO_KEEPALIVE", "1", "no_keepalive", True, id="flag-1"),
        pytest.param("THREADSERVE_NO_KEEPALIVE", "YES", "no_keepalive", True, id="flag-yes"),
        pytest.param("THREADSERVE_NO_KEEPALIVE", "false", "no_keepalive", False, id="flag-false"),
        pytest.param("THREADSERVE_LOG_FORMAT", "json", "log_format", "json", id="log-format"),
        pytest.param("THREADSERVE_GRACE", "", "grace", 5.0, id="empty-is-unset"),
    ],
)
def test_options_from_the_environment(
    variable: str, value: str, dest: str, expected: object
) -> None:
    assert getattr(parse([], **{variable: value}), dest) == expected


@pytest.mark.parametrize(
    ("variable", "value", "argv", "dest", "expected"),
    [
        pytest.param("THREADSERVE_GRACE", "7", ["--grace", "3"], "grace", 3.0, id="value"),
        pytest.param(
            "THREADSERVE_BIND",
            "127.0.0.1:1,127.0.0.1:2",
            ["--bind", "127.0.0.1:3"],
            "bind",
            ["127.0.0.1:3"],
            id="repeatable-replaced-not-added",
        ),
        pytest.param("THREADSERVE_HANDLER", "discard", ["lines"], "handler", "lines"),
        pytest.param(
            "THREADSERVE_NO_GOODBYE", "1", ["--goodbye", "Bye"], "no_goodbye", False, id="group"
        ),
    ],
)
def test_the_command_line_wins(
    variable: str, value: str, argv: list[str], dest: str, expected: object
) -> None:
    assert getattr(parse(argv, **{variable: value}), dest) == expected


@pytest.mark.parametrize(
    ("variable", "flag", "value"),
    [
        ("THREADSERVE_GRACE", "--grace", "soon"),
        ("THREADSERVE_MAX_CONNECTIONS", "--max-connections", "many"),
        ("THREADSERVE_OVERLOAD", "--overload", "panic"),
        ("THREADSERVE_READ_TIMEOUT", "--read-timeout", "-1"),
        ("THREADSERVE_GRACE", "--grace", "-1"),
        ("THREADSERVE_DRAIN_DELAY", "--drain-delay", "nan"),
        ("THREADSERVE_LOG_LEVEL", "--log-level", "loud"),
    ],
)
def test_a_bad_value_from_the_environment_is_as_clear_as_on_the_command_line(
    variable: str, flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as from_command_line:
        parse([flag, value])
    command_line_error = capsys.readouterr().err
    with pytest.raises(SystemExit) as from_environment:
        parse([], **{variable: value})
    environment_error = capsys.readouterr().err
    assert from_command_line.value.code == from_environment.value.code == 2
    # The same explanation; only what is named differs (the flag, or the variable).
    explanation = command_line_error.split(f"argument {flag}: ")[1].strip()
    assert f"environment variable {variable}: {explanation}" in environment_error


def test_a_flag_from_the_environment_must_say_yes_or_no(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse([], THREADSERVE_NO_NOTICES="maybe")
    assert exited.value.code == 2
    assert "THREADSERVE_NO_NOTICES: 'maybe' is not a yes/no value" in capsys.readouterr().err


def test_every_option_has_an_environment_variable() -> None:
    serve = next(
        sub
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
        if name == "serve"
    )
    names = {}
    for action in serve._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        names[action.dest] = variable_name(action)
    assert names["bind"] == "THREADSERVE_BIND"
    assert names["max_connections_per_ip"] == "THREADSERVE_MAX_CONNECTIONS_PER_IP"
    assert names["handler"] == "THREADSERVE_HANDLER"
    assert all(name and name.startswith("THREADSERVE_") for name in names.values()), names
    assert len(set(names.values())) == len(names)  # No two options share a variable.


def test_help_says_the_environment_can_set_every_option_and_the_command_line_wins() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())
    assert "Every option can also be set as THREADSERVE_<OPTION>" in flat
    assert "The command line wins over the environment" in flat


def test_a_server_configured_from_the_environment() -> None:
    env = subprocess_env()
    env.update(
        THREADSERVE_BIND="127.0.0.1:0",
        THREADSERVE_GOODBYE="Bye from the environment",
        THREADSERVE_HANDLER="lines",
        THREADSERVE_LOG_LEVEL="INFO",
    )
    with ServerProcess(["--goodbye", "Bye from the command line"], env=env) as server:
        address = server.wait_serving()
        with connect(address) as client:
            client.sendall(b"one line\n")
            assert recv_exactly(client, 9) == b"one line\n"
            server.send_signal(signal.SIGTERM)
            assert recv_until_eof(client) == b"Bye from the command line\n"
        assert server.wait_exit() == 0, server.output()


def test_idle_thread_options_reach_the_server() -> None:
    from threadserve.cli import build_server

    args = parse(["echo", "--idle-threads", "0", "--idle-thread-timeout", "2.5"])
    server = build_server(args, ["127.0.0.1:0"])
    try:
        assert (server._threads.max_idle, server._threads.idle_timeout) == (0, 2.5)
    finally:
        server.stop()
    # Refused by the command line itself (exit 2), before any server is built.
    with pytest.raises(SystemExit) as exited:
        parse(["echo", "--idle-threads", "-1"])
    assert exited.value.code == 2
