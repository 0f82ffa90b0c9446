"""Where every thread of a stuck CPython 3.11 server is, and who has the GIL.

    gdb -p PID -batch -x bench/gdb_stacks.py

py-spy 0.4.3 cannot read this machine's interpreter (pyenv's 3.11.7 with a
shared libpython: "Failed to find python version from target process"), and
a server with 10,000 threads is what needs looking at. gdb can: this script
walks the interpreter's thread states (``tstate->cframe->current_frame``,
3.11's layout) for each thread's Python stack, and each thread's native stack
to tell a thread waiting for the GIL (in ``take_gil``) from one blocked on a
lock or in ``poll``. It prints the GIL's state (switch interval, held or
not, drop request), then the stacks grouped and counted, e.g.:

    gil: interval 320000 us, locked 0, switch_number 32932, drop_request 0
    python threads 9657
      9366  GIL-wait   Connection.recv <- Connection.__iter__ <- echo
       ...

gdb stops the process while it reads (a few seconds at 10,000 threads).
Not run by the benchmarks; a tool for looking at a convoy as it happens.
"""

from __future__ import annotations

import collections
from typing import Any

import gdb  # type: ignore[import-untyped]  # only importable inside gdb

DEPTH = 12  # Python frames read per thread
NATIVE_DEPTH = 10  # native frames looked at to classify a thread


def unicode_text(obj: Any) -> str:
    """A compact ASCII str object's text (code object names are)."""
    header = gdb.lookup_type("PyASCIIObject")
    address = int(obj.cast(gdb.lookup_type("long")))
    length = int(obj.cast(header.pointer()).dereference()["length"])
    data = gdb.selected_inferior().read_memory(address + header.sizeof, min(length, 200))
    return bytes(data).decode("latin-1")


def python_stacks() -> dict[int, list[str]]:
    """Native thread id -> its Python frames' qualified names, innermost first."""
    stacks: dict[int, list[str]] = {}
    interp = gdb.parse_and_eval("_PyRuntime")["interpreters"]["head"]
    tstate = interp["threads"]["head"]
    while int(tstate) != 0:
        names: list[str] = []
        try:
            frame = tstate["cframe"]["current_frame"]
            while int(frame) != 0 and len(names) < DEPTH:
                names.append(unicode_text(frame["f_code"]["co_qualname"]))
                frame = frame["previous"]
        except gdb.error as exc:
            names.append(f"<unreadable: {exc}>")
        stacks[int(tstate["native_thread_id"])] = names
        tstate = tstate["next"]
    return stacks


def native_state(thread: Any) -> str:
    """What a thread's native stack says it waits for."""
    try:
        thread.switch()
        frame = gdb.newest_frame()
        names: list[str] = []
        while frame is not None and len(names) < NATIVE_DEPTH:
            names.append(frame.name() or "?")
            frame = frame.older()
    except gdb.error:
        return "unreadable"
    if "take_gil" in names:
        return "GIL-wait"
    if "drop_gil" in names:
        return "GIL-drop"
    if "PyThread_acquire_lock_timed" in names:
        return "lock-wait"
    if any("poll" in name for name in names):
        return "poll"
    return "/".join(names[:3])


def main() -> None:
    runtime = gdb.parse_and_eval("_PyRuntime")
    gil = runtime["ceval"]["gil"]
    ceval = runtime["interpreters"]["main"]["ceval"]
    print(
        f"gil: interval {int(gil['interval'])} us, locked {int(gil['locked']['_value'])}, "
        f"switch_number {int(gil['switch_number'])}, "
        f"drop_request {int(ceval['gil_drop_request']['_value'])}"
    )
    stacks = python_stacks()
    print(f"python threads {len(stacks)}")
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for thread in gdb.selected_inferior().threads():
        python = " <- ".join(stacks.get(thread.ptid[1], ["(no Python frame)"])[:4])
        counts[(native_state(thread), python)] += 1
    for (state, python), count in counts.most_common(40):
        print(f"{count:6d}  {state:10s} {python}")


main()
