"""Progress for long jobs: inputs done out of a total, a rate and an ETA; one line every INTERVAL_S in a log,
one live line on a terminal that ends as one line.

The count is what the user asked for, inputs scored: the rows Ray Data's model replicas have
produced, read from its operators at each step of its execution loop (an ExecutionCallback,
the hook Ray Data's own callbacks use). Archive members are counted into the total as their
readers list them, so the total grows until the last archive is listed (`5,000+`). Ray Data's
own progress (operator bars, or a block of internals every 10 s in a log) is turned off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass

from ray.data._internal.execution.execution_callback import ExecutionCallback

INTERVAL_S = float(os.environ.get("HAPPYSAD_PROGRESS_S", 10))  # between two lines in a log
TERMINAL_S = 0.5  # between two redraws of the live line


@dataclass
class Counts:
    done: int = 0  # rows the replicas produced
    files: int = 0  # inputs known before the job started
    members: int = 0  # archive members listed so far
    listing: bool = False  # archive readers still at work: the total may grow


class Watch(ExecutionCallback):
    """Copies the replicas' and the archive readers' row counts into `Watch.counts` while a job runs."""

    counts: Counts | None = None

    def on_execution_step(self, executor) -> None:
        counts = Watch.counts
        if counts is None:
            return
        try:
            for op in executor._topology:  # as Ray Data's own callbacks read it
                if op.name.startswith("MapBatches(") and op.name.endswith("Replica)"):  # score's or evaluate's
                    counts.done = op.metrics.rows_task_outputs_generated
                elif op.name == "MapBatches(read_archive)":
                    counts.members = op.metrics.rows_task_outputs_generated
                    counts.listing = not op.has_execution_finished()
        except Exception:  # noqa: BLE001 - Ray Data internals moved: progress stops, the job must not
            Watch.counts = None


@contextlib.contextmanager
def reporting(what: str, files: int, archives: bool):
    """While the block runs (build the Dataset inside it: Ray Data keeps the context it was made with), show
    `what: done/total, img/s, ETA`: every INTERVAL_S on a non-terminal, a live line on a terminal."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    saved = list(context.custom_execution_callback_classes)
    context.custom_execution_callback_classes = [*saved, Watch]
    Watch.counts = counts = Counts(files=files, listing=archives)
    terminal = sys.stderr.isatty()
    stop, started = threading.Event(), time.monotonic()

    def show() -> None:
        while not stop.wait(TERMINAL_S if terminal else INTERVAL_S):
            text = line(what, counts, time.monotonic() - started)
            print(f"\r{text}\x1b[K" if terminal else text, end="" if terminal else "\n", file=sys.stderr, flush=True)

    thread = threading.Thread(target=show, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join()
        if terminal and counts.done:  # the live line ends as one line
            print(f"\r{line(what, counts, time.monotonic() - started)}\x1b[K", file=sys.stderr, flush=True)
        Watch.counts = None
        context.custom_execution_callback_classes = saved


def line(what: str, counts: Counts, seconds: float) -> str:
    total = counts.files + counts.members
    rate = counts.done / seconds if seconds > 0 else 0.0
    if counts.listing:
        return f"{what}: {counts.done:,}/{total:,}+ (archives still being listed), {rate:.1f} img/s"
    eta = f", ETA {(total - counts.done) / rate:.0f} s" if rate > 0 and counts.done < total else ""
    share = f" ({counts.done / total:.0%})" if total else ""
    return f"{what}: {counts.done:,}/{total:,}{share}, {rate:.1f} img/s{eta}"
