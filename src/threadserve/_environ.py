"""Command-line options from the environment: ``THREADSERVE_<OPTION>``.

Containers and service managers configure through the environment, so every
option of every subcommand can also be given as a variable named after its
long flag: ``--grace`` is ``THREADSERVE_GRACE``, ``--max-connections-per-ip``
is ``THREADSERVE_MAX_CONNECTIONS_PER_IP``, the positional ``HANDLER`` is
``THREADSERVE_HANDLER``. The command line wins over the environment.

How a value is read:

- An option taking a value goes through the option's own ``type`` and
  ``choices``, so a bad value gets the same message as on the command line,
  naming the variable instead of the flag, and exit status 2.
- A flag (``--no-keepalive``) takes ``1``/``true``/``yes``/``on`` or
  ``0``/``false``/``no``/``off``, any case.
- A repeatable option (``--bind``) takes a comma-separated list.
- An empty variable counts as unset.

Why defaults rather than extra arguments: the values found here become the
parser's defaults, so anything given on the command line simply replaces
them. Splicing them into ``argv`` instead would make ``--bind`` from the
environment add to ``--bind`` on the command line, and two members of a
mutually exclusive group (``THREADSERVE_NO_GOODBYE`` with ``--goodbye``)
collide. Two cases need a step after parsing: argparse appends a repeatable
option's values to its default, so those are filled in only when the command
line gave none; and in a mutually exclusive group a member the environment
set is put back to its own default when the command line set another member.

Options whose help is hidden (``argparse.SUPPRESS``) are internal plumbing
and are not read from the environment.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

PREFIX = "THREADSERVE_"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

HELP = f"""\
environment:
  Every option can also be set as {PREFIX}<OPTION>, its long name in capitals
  with - as _: {PREFIX}BIND=127.0.0.1:9000, {PREFIX}GRACE=10,
  {PREFIX}LOG_LEVEL=WARNING, {PREFIX}HANDLER=app:handle. Flags take 1 or 0
  ({PREFIX}NO_KEEPALIVE=1); --bind takes a comma-separated list. The command
  line wins over the environment.
"""


def variable_name(action: argparse.Action) -> str | None:
    """The environment variable for ``action``, or None for help, version and hidden ones."""
    if action.help == argparse.SUPPRESS or isinstance(
        action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
    ):
        return None
    longs = [option for option in action.option_strings if option.startswith("--")]
    name = longs[0][2:] if longs else action.dest if not action.option_strings else None
    if not name:
        return None
    return PREFIX + name.upper().replace("-", "_")


def _is_flag(action: argparse.Action) -> bool:
    return action.nargs == 0 and isinstance(action.const, bool)


def _convert(action: argparse.Action, text: str) -> Any:
    """``text`` through the action's type and choices, as the command line would."""
    converter = action.type
    if not callable(converter):  # None (a plain string), or a registered type name.
        value: Any = text
    else:
        try:
            value = converter(text)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
        except (TypeError, ValueError):
            type_name = getattr(converter, "__name__", repr(converter))
            raise ValueError(f"invalid {type_name} value: {text!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(repr(choice) for choice in action.choices)
        raise ValueError(f"invalid choice: {text!r} (choose from {choices})")
    return value


def _value(action: argparse.Action, text: str) -> Any:
    if _is_flag(action):
        word = text.strip().lower()
        if word in _TRUE:
            return action.const
        if word in _FALSE:
            return not action.const
        raise ValueError(f"{text!r} is not a yes/no value (use 1 or 0)")
    if isinstance(action, argparse._AppendAction):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise ValueError(f"{text!r} names nothing")
        return [_convert(action, item) for item in items]
    return _convert(action, text)


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found.extend(_subparsers(sub))
    return found


def apply_environment(
    parser: argparse.ArgumentParser, environ: Mapping[str, str]
) -> tuple[dict[argparse.ArgumentParser, dict[str, Any]], dict[str, tuple[Any, list[Any]]]]:
    """Make the ``THREADSERVE_*`` values in ``environ`` the defaults of ``parser`` and its
    subcommands; a bad value exits through ``parser.error`` (status 2).

    Returns, per parser, the original defaults of what the environment set
    (``parse_args`` needs them to let the command line win within a group),
    and the repeatable options' values, which stay out of the defaults (by
    dest: the original default and the values).
    """
    replaced: dict[argparse.ArgumentParser, dict[str, Any]] = {}
    repeated: dict[str, tuple[Any, list[Any]]] = {}
    for sub in _subparsers(parser):
        for action in sub._actions:
            name = variable_name(action)
            text = environ.get(name, "") if name else ""
            if not name or not text.strip():
                continue
            try:
                value = _value(action, text)
            except ValueError as exc:
                sub.error(f"environment variable {name}: {exc}")
            if isinstance(action, argparse._AppendAction):
                repeated[action.dest] = (action.default, value)
                continue
            replaced.setdefault(sub, {})[action.dest] = action.default
            action.default = value
    return replaced, repeated


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with defaults from ``environ``; the command line wins."""
    replaced, repeated = apply_environment(parser, environ)
    args = parser.parse_args(argv)
    for dest, (default, values) in repeated.items():
        if hasattr(args, dest) and getattr(args, dest) == default:
            setattr(args, dest, values)
    for sub, originals in replaced.items():
        for group in sub._mutually_exclusive_groups:
            dests = {action.dest: action for action in group._group_actions}
            from_environment = [dest for dest in dests if dest in originals]
            # Set on the command line: differs from the default the environment gave it,
            # or is a member the environment did not touch and differs from its own default.
            from_command_line = [
                dest
                for dest, action in dests.items()
                if getattr(args, dest, action.default) != action.default
            ]
            if from_command_line:
                for dest in from_environment:
                    if dest not in from_command_line:
                        setattr(args, dest, originals[dest])
    return args
