"""How many GIL waiters it takes to stall the interpreter, at a given switch interval.

    python -m bench.gil_waiters                      the table below, pinned to CPU 0
    python -m bench.gil_waiters --waiters 3000 --interval 0.005

W threads block on a lock each (without the GIL); the main thread releases
them all at once, so all W queue for the GIL, and then runs Python for one
second of wall time. A healthy interpreter hands the GIL to each waiter once
(each has a few bytecodes left) and the main thread gets most of the second.
In the convoy, the waiters' timed wake-ups (one per switch interval each, see
src/threadserve/_gil.py) use the core and the main thread gets nothing done.
Each case runs in a fresh process, pinned to one core like the server in the
other benchmarks. Reported: the main thread's loop count and CPU, and the CPU
everything else in the process used during that second.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

CASES = [(w, i) for w in (100, 1_000, 3_000, 10_000) for i in (0.005, 0.05, 0.5)]


def one_case(waiters: int, interval: float) -> str:
    sys.setswitchinterval(interval)
    threading.stack_size(256 * 1024)
    locks = [threading.Lock() for _ in range(waiters)]
    for lock in locks:
        lock.acquire()

    def waiter(lock: threading.Lock) -> None:
        lock.acquire()  # Blocks without the GIL; once released, queues for it.
        total = 0
        for i in range(100):  # A few bytecodes, then done.
            total += i

    threads = [threading.Thread(target=waiter, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    cpu0, main0, wall0 = time.process_time(), time.thread_time(), time.monotonic()
    for lock in locks:
        lock.release()
    loops = 0
    while time.monotonic() - wall0 < 1.0:
        loops += 1
    cpu1, main1, wall1 = time.process_time(), time.thread_time(), time.monotonic()
    for thread in threads:
        thread.join()
    return (
        f"| {waiters:,} | {interval * 1000:g} ms | {loops:,} | {main1 - main0:.2f} s "
        f"| {(cpu1 - cpu0) - (main1 - main0):.2f} s | {wall1 - wall0:.2f} s |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gil_waiters", description=__doc__)
    parser.add_argument("--waiters", type=int, help="one case: this many waiting threads")
    parser.add_argument("--interval", type=float, default=0.005, help="switch interval (s)")
    parser.add_argument("--cpu", default="0", help="core to pin each case to (taskset)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per case at most")
    args = parser.parse_args(argv)
    if args.waiters is not None:
        print(one_case(args.waiters, args.interval), flush=True)
        return 0
    print("| waiters | switch interval | main loops | main CPU | others' CPU | wall |")
    print("|---|---|---|---|---|---|")
    for waiters, interval in CASES:
        command = [sys.executable, "-m", "bench.gil_waiters", "--waiters", str(waiters)]
        command += ["--interval", str(interval)]
        try:
            done = subprocess.run(
                ["taskset", "-c", args.cpu, *command],
                capture_output=True,
                text=True,
                timeout=args.timeout,
                check=False,
            )
            print(done.stdout.strip() or f"| {waiters:,} | {interval} | failed: {done.stderr}")
        except subprocess.TimeoutExpired:
            print(f"| {waiters:,} | {interval * 1000:g} ms | 0 | - | - | > {args.timeout:g} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
