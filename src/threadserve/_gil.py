"""Keep the GIL hand-off from collapsing when thousands of threads want it.

Why
===

A thread that wants the GIL while another holds it waits on a condition
variable with a timeout of ``sys.getswitchinterval()`` (5 ms by default), and
at every timeout wakes up, takes the GIL's internal mutex, sets a "drop
request" if nothing moved, and waits again (CPython 3.10 to 3.13,
``take_gil`` in ``Python/ceval_gil.c``). One waiter costs 200 wake-ups a
second; a thousand cost 200,000, on the core the interpreter runs on, and
every drop request they set forces whoever holds the GIL to let go after a
few bytecodes. Past a point the waiters' wake-ups use the whole core, every
request needs more hand-offs, so more threads wait: a convoy that does not
end by itself. Measured here (``bench/gil_waiters.py``): 3,000 threads that
each need the GIL once, against one thread running Python for a second,
pinned to one core; with the default 5 ms the running thread got nothing done
in some runs and the process burned 2.2 s of CPU; 10,000 waiters at 50 ms
the same; at 500 ms both ran normally.

In a thread-per-connection server, a waiter is a connection whose data just
arrived, so the number of waiters is bounded by the number of connections.
What keeps the convoy away is keeping waiters x (1 / interval) bounded, so
the interval grows with the number of connection threads: 50 µs per thread,
never below the interval the process had, never above 1 s. Connection threads
give the GIL up at every socket call anyway; the interval only matters for a
thread that computes without one, and with thousands of connections such a
thread would make everyone wait regardless.

The interval is process-wide, so the count is too: every Server in the
process adds to it. The interval set before the first server raised it is
restored when the count falls back. A process that set its own interval
after ours is left alone.
"""

from __future__ import annotations

import sys
import threading

#: Added to the switch interval per live connection thread.
PER_THREAD = 50e-6
#: The most it is raised to.
CEILING = 1.0
#: Change it only when the target moved by this factor: no churn on every connection.
HYSTERESIS = 2.0

# The count, as a list's length: append and delete are each one step that no
# other thread can split (the GIL, or the list's own lock without one), so
# counting takes no lock. Every connection comes here twice.
_counted: list[None] = []
_lock = threading.Lock()  # Taken only to change the interval.
_base: float | None = None  # The process's own interval, before we raised it.
_ours: float | None = None  # What we set it to last.


def target_interval(threads: int, base: float) -> float:
    """The switch interval for ``threads`` live connection threads."""
    return min(CEILING, max(base, threads * PER_THREAD))


def threads_changed(delta: int) -> None:
    """Count connection threads in or out; adjust the interval when it moved enough."""
    if delta > 0:
        _counted.extend([None] * delta)
    elif delta < 0:
        del _counted[delta:]  # The slice's end is found within the one step.
    # With fewer threads than would double the interval, and no raise of ours
    # to undo, nothing moves. A retune under way (the lock held) may have
    # read the count before this change and not yet published its raise in
    # _ours: this change then retunes after it, or the last thread to leave
    # could leave the interval raised for good.
    if (
        _ours is None
        and not _lock.locked()
        and len(_counted) * PER_THREAD < sys.getswitchinterval() * HYSTERESIS
    ):
        return
    _retune()


def _retune() -> None:
    global _base, _ours
    with _lock:
        threads = len(_counted)
        current = sys.getswitchinterval()
        if _ours is not None and current != _ours:
            _base, _ours = None, None  # Someone else set it since: theirs now.
        base = current if _base is None else _base
        target = target_interval(threads, base)
        if _ours is None:
            if target < base * HYSTERESIS:
                return
            _base = base
        elif _ours / HYSTERESIS < target < _ours * HYSTERESIS and target != base:
            return
        sys.setswitchinterval(target)
        if target == base:
            _base, _ours = None, None  # Back to the process's own value.
        else:
            # Read back: CPython keeps whole microseconds, so 0.1 reads as 0.099999.
            _ours = sys.getswitchinterval()


def live_threads() -> int:
    """Connection threads counted now, over every server in the process."""
    return len(_counted)
