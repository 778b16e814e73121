"""Peak memory and throughput of `happysad score` at N and 10xN images.

    python bench/score_memory.py [--n 300] [--factor 10]

Each size runs `happysad score` in a fresh process that starts its own local
Ray cluster; every 0.5 s the PSS of that process and all its descendants
(GCS, raylet, workers, model actor) is summed from /proc (PSS counts shared
memory such as the object store once). Prints peak memory, images/s and the
ratio of the two peaks: bounded memory means a ratio near 1.
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
sys.path.insert(0, str(REPO))

from happysad import synth  # noqa: E402


def children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


PSS_SAMPLE_S = 2.0  # one sample of a job's ~15 Ray processes costs ~80 ms of CPU: every 0.5 s it took ~7% of 2 cores


def wait_sampling_pss(proc: subprocess.Popen) -> float:
    """Wait for `proc` to end (returning as soon as it does); its process tree's peak PSS in MB, sampled."""
    peak = 0.0
    while True:
        peak = max(peak, tree_pss_mb(proc.pid))
        try:
            proc.wait(timeout=PSS_SAMPLE_S)
            return peak
        except subprocess.TimeoutExpired:
            continue


def tree_pss_mb(root: int) -> float:
    tree, todo, total = children_map(), [root], 0
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def score(images: Path, model: Path, output: Path) -> tuple[float, float]:
    """(peak PSS in MB, images/s end to end) of one scoring run."""
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)  # a fresh local cluster, owned by (and measured under) the scoring process
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "happysad.cli", "score", "--model", str(model), "--input", str(images), "--output", str(output)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    peak = wait_sampling_pss(proc)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"scoring {images} failed with exit code {proc.returncode}")
    n = sum(1 for _ in images.iterdir())
    return peak, n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--factor", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from happysad.model import build_model

        model = tmp / "model.keras"
        build_model().save(model)
        samples = [synth.sample(0, i) for i in range(50)]
        results = {}
        for n in (args.n, args.n * args.factor):
            images = tmp / f"images-{n}"
            images.mkdir()
            for i in range(n):
                s = samples[i % len(samples)]
                (images / f"{i:07d}.{s.extension}").write_bytes(s.data)
            results[n] = score(images, model, tmp / f"scores-{n}")
            print(f"{n:>7} images: peak PSS {results[n][0]:8.0f} MB   {results[n][1]:6.1f} img/s end to end", flush=True)
        (small, large) = results.values()
        print(f"peak memory ratio {args.factor}x images: {large[0] / small[0]:.2f}x   throughput ratio: {large[1] / small[1]:.2f}x")


if __name__ == "__main__":
    main()
