"""--cache auto on a head whose object store is smaller than the decoded set: it streams, spills nothing,
and trains exactly as a cached run of the same data does (same seed, same order)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO, kill_group, start_head
from happysad import synth

STORE_BYTES = 100_000_000  # the small head's object store
IMAGES = 600  # decoded: 600 x 256 x 256 x 3 = 118 MB, more than that whole store


@pytest.fixture(scope="module")
def big_set(tmp_path_factory) -> Path:
    """600 distinct faces as 64 px JPEGs: quick to write and read; decoding resizes them to 256."""
    root = tmp_path_factory.mktemp("big")
    for index in range(IMAGES):
        label = synth.CLASSES[index % 2]
        face = synth.draw_face(np.random.default_rng([7, index]), label, side=64)
        (root / label).mkdir(exist_ok=True)
        cv2.imwrite(str(root / label / f"{index:05d}.jpg"), face)
    return root


@pytest.fixture(scope="module")
def small_head():
    """A second Ray head with a 100 MB object store, started and stopped by this process (never `ray stop`)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="hssmall-", dir="/tmp"))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # stop at once when told to (see conftest.ray_head)
    head, port, _ = start_head(
        ["--node-ip-address=127.0.0.1", "--num-cpus=2", f"--object-store-memory={STORE_BYTES}",
         f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats"],
        env, temp_dir, dashboard=False,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        # Its own driver, since this process is the shared head's: Ray Data's detached actors add 30 s to a stop.
        release = "import ray, conftest; ray.init(address=%r); conftest.release_detached_actors()" % f"127.0.0.1:{port}"
        subprocess.run([sys.executable, "-c", release], cwd=Path(__file__).parent, env=env, capture_output=True, timeout=120)
        head.send_signal(signal.SIGTERM)  # --block: the head stops every process it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def start_training(data: Path, output: Path, address: str) -> subprocess.Popen:
    env = dict(os.environ, RAY_ADDRESS=address, RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1")
    args = ["--data", str(data), "--output", str(output), "--epochs", "1", "--cache", "auto"]
    log = open(f"{output}.log", "w")
    return subprocess.Popen([sys.executable, "jobs/train.py", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def finished(run: subprocess.Popen, output: Path) -> dict:
    log = Path(f"{output}.log").read_text()
    assert run.wait(timeout=480) == 0, log[-4000:]
    assert "OutOfMemory" not in log
    return json.loads((output / "metrics.json").read_text())


def object_store_stats(address: str) -> str:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    ray = str(Path(sys.executable).parent / "ray")
    result = subprocess.run([ray, "memory", "--stats-only", "--address", address], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_auto_streams_a_set_larger_than_the_object_store_without_spilling_and_matches_a_cached_run(
    ray_session, small_head, big_set, tmp_path
):
    cached_out, streamed_out = tmp_path / "cached", tmp_path / "streamed"
    runs = [start_training(big_set, cached_out, ray_session["address"]), start_training(big_set, streamed_out, small_head)]
    try:
        cached, streamed = finished(runs[0], cached_out), finished(runs[1], streamed_out)
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()

    assert cached["cache"]["mode"] == "memory"  # the shared head's 1.5 GB store holds 118 MB at 50%
    assert streamed["cache"]["mode"] == "none"
    assert streamed["cache"]["reason"].startswith(f"{IMAGES} images (from the listing) decode to 118 MB, over 50% of the 100 MB")
    stats = object_store_stats(small_head)
    assert "Plasma memory usage" in stats and "Spilled" not in stats, stats

    assert streamed["counts"] == cached["counts"] and sum(streamed["counts"]["train"].values()) > 350
    for split in ("val", "test"):
        for name in ("loss", "accuracy", "precision", "recall", "auc"):
            assert streamed[split][name] == pytest.approx(cached[split][name], abs=1e-4), (split, name)
    assert streamed["threshold"]["value"] == pytest.approx(cached["threshold"]["value"], abs=1e-4)
    train = [(cached_out / "history.csv").read_text(), (streamed_out / "history.csv").read_text()]
    losses = [float(text.splitlines()[1].split(",")[1]) for text in train]
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)
