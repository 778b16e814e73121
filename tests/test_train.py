"""Training on the shared local Ray head: sync, uneven data, metrics, S3, kill, resume, job submit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import BUCKET, REPO, upload_tree
from happysad import storage, synth
from happysad.decode import decode_image
from happysad.model import build_model
from happysad.split import split_of
from happysad.storage import UsageError
from happysad.train import TrainConfig, run

FAST = {"epochs": 2, "batch_size": 8, "collective_timeout_s": 180}


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    """41 faces (an odd count) plus one bad file in one class."""
    root = synth.make_data(tmp_path_factory.mktemp("odd"), n=41, seed=11)
    (root / "sad" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


def test_model_is_the_seed_cnn():
    model = build_model()
    assert model.count_params() == 3_696_625
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Rescaling"] + ["Conv2D", "MaxPooling2D"] * 3 + ["Flatten", "Dense", "Dense"]
    assert [layer.filters for layer in model.layers if hasattr(layer, "filters")] == [16, 32, 16]
    assert model.layers[-1].activation.__name__ == "sigmoid" and model.layers[-1].units == 1
    assert model.layers[-3].output.shape[-1] == 30 * 30 * 16


@pytest.mark.parametrize(
    "args, named",
    [
        (["--workers", "0"], "--workers"),
        (["--epochs", "ten"], "--epochs"),
        (["--val-fraction", "0.8", "--test-fraction", "0.3"], "--test-fraction"),
        (["--data", "/no/such/folder"], "/no/such/folder"),
        (["--resume"], "--resume"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, named):
    result = subprocess.run([sys.executable, "jobs/train.py", *args], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


def numpy_metrics(model, data_root: Path, split: str, seed: int = 0) -> dict:
    """The test metrics recomputed with numpy from the saved model and the files on disk."""
    images, labels = [], []
    for label_id, label in enumerate(("happy", "sad")):
        for path in sorted((data_root / label).iterdir()):
            data = path.read_bytes()
            if split_of(data, seed) == split and path.name != "broken.jpg":
                images.append(decode_image(data))
                labels.append(label_id)
    y = np.array(labels, np.float64)
    p = np.asarray(model.predict(np.stack(images), verbose=0), np.float64)[:, 0]
    predicted = p >= 0.5
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    return {
        "n": len(y),
        "accuracy": float(np.mean(predicted == y)),
        "precision": float(np.sum(predicted & (y == 1)) / max(1, np.sum(predicted))),
        "recall": float(np.sum(predicted & (y == 1)) / max(1, np.sum(y == 1))),
        "loss": float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))),
    }


def test_two_workers_uneven_data_on_s3_stay_in_sync_with_global_metrics(ray_session, s3, odd_data, tmp_path):
    data_uri = upload_tree(s3, odd_data, "train/odd")
    output = f"s3://{BUCKET}/runs/two-workers"
    metrics = run(TrainConfig(data=(data_uri,), output=output, workers=2, **FAST))

    assert metrics["skipped"] == {"not_an_image": 1}
    assert sum(sum(c.values()) for c in metrics["counts"].values()) == 41
    hashes = metrics["replica_weight_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert json.loads(storage.read_bytes(f"{output}/metrics.json")) == json.loads(json.dumps(metrics))

    local_model = tmp_path / "two-workers.keras"
    local_model.write_bytes(storage.read_bytes(f"{output}/model.keras"))
    model = keras.models.load_model(local_model, safe_mode=True)
    expected = numpy_metrics(model, odd_data, "test")
    assert metrics["test"]["n"] == expected["n"] == metrics["counts"]["test"]["happy"] + metrics["counts"]["test"]["sad"]
    for key in ("accuracy", "precision", "recall", "loss"):
        assert metrics["test"][key] == pytest.approx(expected[key], abs=1e-4), key

    history = storage.read_bytes(f"{output}/history.csv").decode().splitlines()
    assert history[0].startswith("epoch,loss,accuracy,val_loss,val_accuracy") and len(history) == 3
    assert storage.read_bytes(f"{output}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    events = storage.list_dir(f"{output}/tensorboard", recursive=True)
    assert any("tfevents" in e.base_name for e in events if e.is_file)


def test_existing_run_is_not_overwritten_and_resume_continues(ray_session, tiny_folders, tmp_path):
    output = tmp_path / "run"
    run(TrainConfig(data=(str(tiny_folders),), output=str(output), epochs=1, batch_size=8))
    epoch_one = (output / "history.csv").read_text().splitlines()[1]
    with pytest.raises(UsageError, match="already holds a run"):
        run(TrainConfig(data=(str(tiny_folders),), output=str(output), epochs=2, batch_size=8))
    resumed = run(TrainConfig(data=(str(tiny_folders),), output=str(output), epochs=2, batch_size=8, resume=True))
    history = (output / "history.csv").read_text().splitlines()
    assert resumed["epochs"] == 2
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2"]
    assert history[1] == epoch_one  # epoch 1 came from the checkpoint, not trained again


def test_killed_worker_restarts_from_checkpoint_and_run_completes(ray_session, odd_data, tmp_path):
    import ray.util.state

    output = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = ["--data", str(odd_data), "--output", str(output), "--workers", "2", "--epochs", "6", "--batch-size", "8"]
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen([sys.executable, "jobs/train.py", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not list(output.glob("checkpoint_*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
        assert list(output.glob("checkpoint_*")), (tmp_path / "train.log").read_text()[-3000:]
        workers = ray.util.state.list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        assert len(workers) == 2
        os.kill(workers[1].pid, signal.SIGKILL)
        assert proc.wait(timeout=400) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["epochs"] == 6
    rows = (output / "history.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(e) for e in range(1, 7)]
    assert keras.models.load_model(output / "model.keras", safe_mode=True).count_params() == 3_696_625


def test_ray_job_submit_runs_train(ray_session, tiny_folders, tmp_path):
    output = tmp_path / "job-run"
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_session["dashboard"],
        "--working-dir", ".", "--", "python", "jobs/train.py",
        "--data", str(tiny_folders), "--output", str(output), "--epochs", "1", "--batch-size", "8",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=ray_session["env"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout.lower()
    assert "done: test accuracy" in result.stdout
    assert json.loads((output / "metrics.json").read_text())["epochs"] == 1
