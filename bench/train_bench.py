"""Training, side by side: the project's job (1 and 2 workers) against the seed's pipeline and a plain loop.

    python bench/train_bench.py [--n 600] [--epochs 4] [--repeats 2]

Data comes from `happysad make-data`. Each design runs in its own process:
- job: `happysad train` with 1 and with 2 workers (fresh local Ray cluster each);
  per-epoch images/s from its history.csv (epochs after the first), and fixed
  cost = wall time minus the epochs' time;
- seed: `keras.utils.image_dataset_from_directory` + `model.fit` (Keras 3 `fit`
  on one device, batch 32), per-epoch images/s from a callback;
- plain: the training images decoded once into memory, then the same custom
  step in one process (no Ray, no strategy), batch 32.
All three train on the same files (the job on its 70% train split, the others
on all of them), so the end-to-end figure is images trained per second of wall
time, start-up included.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKER = {
    "seed": """
import sys, time, keras
from happysad.model import build_model
ds = keras.utils.image_dataset_from_directory(DATA, image_size=(256, 256), batch_size=32, label_mode="binary", seed=0)
model = build_model()
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", metrics=["accuracy"])
times = []
class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None): self.t = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None): times.append(time.perf_counter() - self.t)
model.fit(ds, epochs=EPOCHS, callbacks=[Timer()], verbose=0)
n = sum(int(b[0].shape[0]) for b in ds)
print(" ".join(str(n / t) for t in times), n)
""",
    "plain": """
import time, numpy as np, keras, tensorflow as tf
from pathlib import Path
from happysad.decode import decode_image
from happysad.model import build_model
files = sorted(p for p in Path(DATA).rglob("*") if p.is_file())
x = np.stack([decode_image(p.read_bytes()) for p in files])
y = np.array([[float(p.parent.name == "sad")] for p in files], np.float32)
model = build_model()
optimizer = keras.optimizers.Adam(1e-3)
@tf.function
def step(xb, yb):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.binary_crossentropy(yb, model(xb, training=True)))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
rates = []
for epoch in range(EPOCHS):
    order = np.random.default_rng(epoch).permutation(len(x))
    start = time.perf_counter()
    for i in range(0, len(x), 32):
        step(x[order[i:i + 32]], y[order[i:i + 32]])
    rates.append(len(x) / (time.perf_counter() - start))
print(" ".join(map(str, rates)), len(x))
""",
}


def run_job(data: Path, epochs: int, workers: int, out: Path, env: dict) -> tuple[float, list[float], float, int]:
    """(wall s, images/s per epoch, seconds spent in epochs, images trained) of one `happysad train`."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "happysad.cli", "train", "--data", str(data), "--epochs", str(epochs), "--workers", str(workers),
         "--output", str(out), "--val-fraction", "0.2", "--test-fraction", "0.1"],
        cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    with open(out / "history.csv") as f:
        history = list(csv.DictReader(f))
    rates = [float(r["images_per_second"]) for r in history]
    images = [float(r.get("images") or 0) for r in history]
    return wall, rates, sum(n / rate for n, rate in zip(images, rates)), int(sum(images))


def run_worker(name: str, data: Path, epochs: int, env: dict) -> tuple[float, list[float], int]:
    code = WORKER[name].replace("DATA", repr(str(data))).replace("EPOCHS", str(epochs))
    start = time.perf_counter()
    stdout = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    out = stdout.strip().splitlines()[-1].split()  # Keras prints "Found N files ..." before the figures
    return time.perf_counter() - start, [float(v) for v in out[:-1]], int(out[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    # The baselines import Keras before happysad: they get happysad's oneDNN default (happysad/__init__.py) here,
    # or on a CPU without AVX-512 they would run TensorFlow's 2-5x slower Eigen kernels against the job's oneDNN.
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", TF_CPP_MIN_LOG_LEVEL="2",
               TF_ENABLE_ONEDNN_OPTS=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1"))
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from happysad import synth

        data = synth.make_data(tmp / "faces", n=args.n, seed=2)
        steady: dict[str, list[float]] = {}
        fixed: dict[str, list[float]] = {}
        end_to_end: dict[str, list[float]] = {}
        for r in range(args.repeats):
            for workers in (1, 2):
                name = f"job, {workers} worker{'s' * (workers > 1)}"
                wall, rates, epoch_s, trained = run_job(data, args.epochs, workers, tmp / f"run-{workers}-{r}", env)
                steady.setdefault(name, []).append(statistics.median(rates[1:]))
                fixed.setdefault(name, []).append(wall - epoch_s)
                end_to_end.setdefault(name, []).append(trained / wall)
            for name in ("seed", "plain"):
                wall, rates, n = run_worker(name, data, args.epochs, env)
                steady.setdefault(name, []).append(statistics.median(rates[1:]))
                end_to_end.setdefault(name, []).append(n * args.epochs / wall)
        print(f"training, {os.cpu_count()} cores, {args.n} images, {args.epochs} epochs, batch 32, {args.repeats} repetitions; median (min-max)")
        print("| design | img/s per epoch after the first | fixed cost s | images x epochs / wall s |")
        print("| --- | --- | --- | --- |")
        for name in steady:
            print(f"| {name} | {spread(steady[name])} | {spread(fixed[name]) if name in fixed else '-'} | {spread(end_to_end[name])} |")
        plain, seed = statistics.median(steady["plain"]), statistics.median(end_to_end["seed"])
        for name in ("job, 1 worker", "job, 2 workers"):
            print(f"{name}: {statistics.median(steady[name]) / plain:.2f}x plain per epoch; "
                  f"{statistics.median(end_to_end[name]) / seed:.2f}x the seed end to end (the job also validates each epoch)")


if __name__ == "__main__":
    main()
