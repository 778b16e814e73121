"""Progress for long jobs: Ray Data's bars on a terminal, one line at most every 10 s elsewhere.

Ray Data's own non-terminal progress is a multi-line block of operator
internals every 10 s; in a log file a user wants done/total, images/s and an
ETA, once in a while.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable

INTERVAL_S = 10


@contextlib.contextmanager
def reporting(what: str, done: Callable[[], int], total: int | None):
    """While the block runs, print `what: done/total, img/s, ETA` every INTERVAL_S on a non-terminal."""
    import ray

    terminal = sys.stdout.isatty()
    ray.data.DataContext.get_current().enable_progress_bars = terminal
    if terminal:
        yield
        return
    stop = threading.Event()
    started = time.monotonic()

    def report() -> None:
        while not stop.wait(INTERVAL_S):
            try:
                count = done()
            except OSError:  # a file moved under us, a passing S3 error: skip this line
                continue
            print(line(what, count, total, time.monotonic() - started), flush=True)

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def line(what: str, count: int, total: int | None, seconds: float) -> str:
    rate = count / seconds if seconds > 0 else 0.0
    if total:
        eta = f", ETA {(total - count) / rate:.0f} s" if rate > 0 and count < total else ""
        return f"{what}: {count}/{total} ({count / total:.0%}), {rate:.1f} img/s{eta}"
    return f"{what}: {count}, {rate:.1f} img/s"
