"""Where a scoring job's core-seconds go: CPU seconds per process kind (the driver, the model replica, Ray's own
processes, other Ray workers) over one job on a fresh local Ray, read from /proc by sampling every 0.2 s.

    python bench/score_cpu_split.py [--n 20000]

Prints each kind's CPU seconds, its share, and its average cores over the job's wall time. A process that lives
less than one sample interval is missed (its seconds are not counted): the total is a lower bound.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def kind(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver (happysad score)"
    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    for name, label in (("Replica", "model replica"), ("read_archive", "archive readers"), ("raylet", "raylet"),
                        ("gcs_server", "GCS"), ("dashboard", "dashboard and agents"), ("agent", "dashboard and agents"),
                        ("log_monitor", "Ray's monitors"), ("monitor", "Ray's monitors"), ("ray::", "other Ray workers"),
                        ("default_worker", "idle Ray workers")):
        if name in title:
            return label
    return "other: " + title[:40]


def descendants(root: int) -> list[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(REPO))
        from happysad import synth
        from happysad.model import build_model

        build_model().save(tmp / "model.keras")
        folder = synth.make_data(tmp / "faces", n=args.n, seed=1)
        env = dict(os.environ, RAY_ADDRESS="local")  # a fresh local Ray, whatever the job's size
        start = time.perf_counter()
        job = subprocess.Popen([sys.executable, "-m", "happysad.cli", "score", "--model", str(tmp / "model.keras"),
                                "--input", str(folder), "--output", str(tmp / "out")], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        last: dict[int, tuple[str, float]] = {}
        while job.poll() is None:
            for pid in descendants(job.pid):
                try:
                    last[pid] = (kind(pid, job.pid), cpu_seconds(pid))
                except OSError:
                    continue
            time.sleep(0.2)
        wall = time.perf_counter() - start
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
    by_kind: dict[str, float] = {}
    for name, seconds in last.values():
        by_kind[name] = by_kind.get(name, 0.0) + seconds
    total = sum(by_kind.values())
    print(f"score {args.n:,} faces on a fresh local Ray: {wall:.1f} s wall, {total:.1f} CPU s seen ({total / wall:.2f} cores), {os.cpu_count()} cores")
    print("| process | CPU s | share | cores over the job |")
    print("| --- | --- | --- | --- |")
    for name, seconds in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"| {name} | {seconds:.1f} | {seconds / total:.0%} | {seconds / wall:.2f} |")


if __name__ == "__main__":
    main()
