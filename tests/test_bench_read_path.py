"""`python -m bench.read_path` runs and measures the three reads it names.

A diagnostic whose variants stopped reading (an API change, a read that
returns nothing) would report the cost of doing nothing: its warm-up round
checks that each variant reads back the message, and raises otherwise.
"""

from __future__ import annotations

import socket

import pytest

from bench import read_path


def test_it_reports_each_read_against_the_bare_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert read_path.main(["--messages", "20", "--repeats", "2"]) == 0
    output = capsys.readouterr().out
    rows = [line for line in output.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| socket.recv",
        "| Connection.recv()",
        "| next(iter(conn))",
    ]
    assert rows[1].endswith("| +0 |")


def test_a_round_sends_one_message_per_read() -> None:
    sender, reader = socket.socketpair()
    received: list[bytes] = []

    def read() -> bytes:
        received.append(reader.recv(4096))
        return received[-1]

    try:
        read_path.cpu_per_message(sender, read, 3)
    finally:
        sender.close()
        reader.close()
    assert received == [read_path.MESSAGE] * 3
