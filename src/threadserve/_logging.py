"""Log output for people (``--log-format text``) and for machines (``--log-format json``).

The server's log calls carry their facts as ``extra=`` fields besides the
message: ``event`` (``connection_opened``, ``connection_closed``,
``connection_rejected``, ``serving``, ``stopping``, ``stopped``, ...), and where
they apply ``peer``, ``duration`` (seconds), ``bytes_in``, ``bytes_out`` and
``reason`` (one of the fixed values in _events.py). Behind a PROXY-protocol
proxy, ``peer`` is the client the proxy reported and the opening line's
``proxy`` the proxy's own address. The text format ignores
them, so its lines read as they always did; the JSON format writes them as
keys, one object per line, so a log shipper needs no regular expression.

A JSON line always has ``time`` (UTC, ISO 8601), ``level``, ``logger``,
``event`` (``log`` for a record that names none: an application's own) and
``message``; the other fields appear when the record has them, ``worker``
when the process is one of a supervisor's workers, and ``exception`` with the
formatted traceback when there is one.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The ``extra=`` fields a JSON line carries when the record has them, in this order.
FIELDS = ("peer", "proxy", "duration", "bytes_in", "bytes_out", "reason", "worker")


def counted(count: int, noun: str) -> str:
    """``count`` and ``noun``, the noun plural unless the count is one: "1 client", "2 clients"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (json.dumps escapes newlines).

    ``worker`` (a worker's id, its pid say) is added to every line that does
    not carry its own.
    """

    def __init__(self, worker: int | str | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        entry: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is None and name == "worker":
                value = self.worker
            if value is not None:
                entry[name] = round(value, 6) if isinstance(value, float) else value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an application's extra field that JSON cannot hold is
        # written as its str() rather than losing the whole line.
        return json.dumps(entry, default=str)


def configure_logging(
    level: str,
    log_format: str = "text",
    *,
    worker: int | str | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Set up the root logger as the command line does; returns the handler it added.

    ``level`` is a level name in any case (``WARNING``, ``warning``).
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
