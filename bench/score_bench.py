"""Scoring, side by side: the project's job against plain single-machine baselines, in one run.

    python bench/score_bench.py [--sizes 2000 20000] [--repeats 2]

Data comes from `happysad make-data`. For each size, each design runs in its own
process, `--repeats` times (median and min-max printed):
- job: `happysad score` end to end as a user runs it with no cluster (RAY_ADDRESS unset): a small
  job (score.IN_PROCESS_MAX) is scored in the driver's process, a larger one on a fresh local Ray;
- job on Ray: the same with RAY_ADDRESS=local, so even a small job starts a local Ray cluster;
- plain: the best in-process pipeline we could write: two threads decode chunks
  of 64 with `decode_image` (cv2 releases the GIL), one compiled model call per
  batch (TF intra-op 1, inter-op 2);
- seed: the seed's loop, `cv2.imread` + resize + `model.predict` one image at a
  time (timed on the first 300 images: it is slow);
- ceiling: cores / (decode CPU-s per image + forward CPU-s per image).
Steady state is the marginal rate between the two sizes: (n2 - n1) / (t2 - t1),
which cancels the fixed start-up cost. Peak memory is the PSS of the process tree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from score_memory import wait_sampling_pss  # noqa: E402

SEED_SAMPLE = 300
DESIGNS = ("job", "job on Ray", "plain", "seed")
BATCH = 64


def images_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def load_compiled(model_path: str):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    from happysad.model import load_model

    model = load_model(model_path)
    return tf.function(lambda x: model(x, training=False), reduce_retracing=True), model


def run_plain(folder: Path, model_path: str) -> int:
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    import numpy as np

    from happysad.decode import decode_image

    cv2.setNumThreads(1)
    predict, _ = load_compiled(model_path)
    paths = images_of(folder)

    def score_chunk(chunk: list[Path]) -> np.ndarray:
        images = np.stack([decode_image(p.read_bytes()) for p in chunk])
        return predict(images).numpy()

    with ThreadPoolExecutor(2) as pool:
        return sum(len(s) for s in pool.map(score_chunk, [paths[i : i + BATCH] for i in range(0, len(paths), BATCH)]))


def run_seed(folder: Path, model_path: str) -> int:
    import cv2
    import numpy as np

    _, model = load_compiled(model_path)
    paths = images_of(folder)[:SEED_SAMPLE]
    for path in paths:
        image = cv2.resize(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), (256, 256))
        model.predict(np.expand_dims(image, 0), verbose=0)
    return len(paths)


def run_ceiling(folder: Path, model_path: str) -> float:
    """Images/s if every core did nothing but decode and forward, from CPU-seconds per image."""
    import cv2
    import numpy as np

    from happysad.decode import decode_image

    cv2.setNumThreads(1)
    predict, _ = load_compiled(model_path)
    data = [p.read_bytes() for p in images_of(folder)[:512]]
    n = max(BATCH, len(data) // BATCH * BATCH)
    start = time.process_time()
    images = np.stack([decode_image(data[i % len(data)]) for i in range(n)])
    decode_s = (time.process_time() - start) / n
    predict(images[:BATCH])  # trace
    start = time.process_time()
    for i in range(0, n, BATCH):
        predict(images[i : i + BATCH]).numpy()
    forward_s = (time.process_time() - start) / n
    return os.cpu_count() / (decode_s + forward_s)


def measure(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak tree PSS MB, stdout) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = wait_sampling_pss(proc)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed ({proc.returncode})")
    return time.perf_counter() - start, peak, out


def design_cmd(design: str, folder: Path, model: Path, output: Path) -> list[str]:
    if design.startswith("job"):
        return [sys.executable, "-m", "happysad.cli", "score", "--model", str(model), "--input", str(folder), "--output", str(output)]
    return [sys.executable, __file__, "--run", design, "--folder", str(folder), "--model", str(model)]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def bench(sizes: list[int], repeats: int) -> None:
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from happysad import synth
        from happysad.model import build_model

        build_model().save(tmp / "model.keras")
        walls: dict[tuple[str, int], list[float]] = {}
        peaks: dict[tuple[str, int], list[float]] = {}
        rows = []
        for n in sizes:
            folder = synth.make_data(tmp / f"faces-{n}", n=n, seed=1)
            for _ in range(repeats):
                for design in DESIGNS:
                    env_of = env | {"RAY_ADDRESS": "local"} if design == "job on Ray" else env
                    wall, peak, out = measure(design_cmd(design, folder, tmp / "model.keras", tmp / f"out-{n}-{time.time_ns()}"), env_of)
                    count = n if design.startswith("job") else int(out.split()[-1])
                    walls.setdefault((design, n), []).append(count / wall)
                    peaks.setdefault((design, n), []).append(peak)
            ceiling = float(measure(design_cmd("ceiling", folder, tmp / "model.keras", tmp), env)[2].split()[-1])
            job, on_ray, plain, seed = (statistics.median(walls[(d, n)]) for d in DESIGNS)
            rows.append(
                f"| {n:,} | {summary(walls[('job', n)])} | {summary(walls[('job on Ray', n)])} | {summary(walls[('plain', n)])} "
                f"| {summary(walls[('seed', n)])} | {ceiling:.0f} | {job / plain:.2f}x | {on_ray / plain:.2f}x | {job / ceiling:.0%} "
                f"| {job / seed:.1f}x | {summary(peaks[('job', n)])} | {summary(peaks[('plain', n)])} |"
            )
        print(f"scoring, {os.cpu_count()} cores, {repeats} repetitions; img/s end to end, median (min-max); seed timed on {SEED_SAMPLE} images")
        print("| images | job | job on Ray | plain | seed | ceiling | job/plain | on Ray/plain | job/ceiling | job/seed | job peak PSS MB | plain peak PSS MB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(rows))
        if len(sizes) == 2:
            (n1, n2) = sizes
            for design in ("job", "job on Ray", "plain"):
                t1 = statistics.median(n1 / r for r in walls[(design, n1)])
                t2 = statistics.median(n2 / r for r in walls[(design, n2)])
                print(f"steady state ({design}): (n2 - n1) / (t2 - t1) = {(n2 - n1) / (t2 - t1):.1f} img/s")
            job_peak = statistics.median(peaks[("job", n2)]) / statistics.median(peaks[("job", n1)])
            print(f"job peak memory at {n2:,} vs {n1:,}: {job_peak:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run", choices=["plain", "seed", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print({"plain": run_plain, "seed": run_seed, "ceiling": run_ceiling}[args.run](args.folder, args.model))
        return
    bench(args.sizes, args.repeats)


if __name__ == "__main__":
    main()
