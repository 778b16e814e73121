"""Training on the shared local Ray head: sync, uneven data, metrics, S3, kill, resume, job submit."""

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import BUCKET, REPO, run_cli, upload_tree, wait_for_registered_checkpoint
from happysad import sources, storage, synth
from happysad.cli import _config, build_parser
from happysad.decode import decode_image
from happysad.metrics import KERAS_METRICS, binary_metrics, choose_threshold
from happysad.model import build_model
from happysad.score import open_model
from happysad.split import split_of
from happysad.storage import UsageError
from happysad.train import TrainConfig, _new_run_dir, cache_mode, count_images, pad_to_multiple, prepare_datasets, run

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
        (["--seed", "-1"], "--seed -1"),
        (["--seed", str(2**32)], f"--seed {2**32}"),
        (["--workers", "3", "--batch-size", "8"], "--batch-size 8 is not a multiple of --workers 3"),
        (["--output", "s3://some-bucket/"], "--output s3://some-bucket/"),
        (["--cache", "disk"], "--cache"),
        (["--max-failures", "-1"], "--max-failures -1"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, named, tmp_path):
    # The timeout turns the old behaviour (a run that starts, then fails or waits for CPUs) into a failure.
    cmd = [sys.executable, str(REPO / "jobs/train.py"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert list(tmp_path.glob("runs/*")) == []  # no empty run folder left behind


def split_images(data_root: Path, split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(decoded images, labels) of one split of a class-folder data set, read from disk."""
    images, labels = [], []
    for label_id, label in enumerate(("happy", "sad")):
        for path in sorted((data_root / label).iterdir()):
            data = path.read_bytes()
            if split_of(data, seed) == split and path.name != "broken.jpg":
                images.append(decode_image(data))
                labels.append(label_id)
    return np.stack(images), np.array(labels, np.float64)


def scores(model, images: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(images, verbose=0), np.float64)[:, 0]


def f1(predicted: np.ndarray, y: np.ndarray) -> float:
    tp = np.sum(predicted & (y == 1))
    return float(2 * tp / (2 * tp + np.sum(predicted & (y == 0)) + np.sum(~predicted & (y == 1))))


def numpy_metrics(model, data_root: Path, split: str, seed: int = 0, threshold: float = 0.5) -> dict:
    """A split's metrics recomputed with numpy from the saved model and the files on disk.

    At or above the threshold is sad, compared in float32, as `score` labels (the model's scores are float32).
    """
    images, y = split_images(data_root, split, seed)
    p = scores(model, images)
    predicted = p.astype(np.float32) >= np.float32(threshold)
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
    # Seed 5 puts 29 images (odd) in the train split: 2 workers need a padding row, or one image is lost.
    metrics = run(TrainConfig(data=(data_uri,), output=output, workers=2, seed=5, **FAST))

    assert metrics["skipped"] == {"not_an_image": 1}
    assert sum(sum(c.values()) for c in metrics["counts"].values()) == 41
    assert sum(metrics["counts"]["train"].values()) == 29
    hashes = metrics["replica_weight_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert json.loads(storage.read_bytes(f"{output}/metrics.json")) == json.loads(json.dumps(metrics))

    local_model = tmp_path / "two-workers.keras"
    local_model.write_bytes(storage.read_bytes(f"{output}/model.keras"))
    model = keras.models.load_model(local_model, safe_mode=True)
    assert metrics["test"]["threshold"] == metrics["threshold"]["value"]  # test metrics use the chosen threshold
    expected = numpy_metrics(model, odd_data, "test", seed=5, threshold=metrics["test"]["threshold"])
    assert metrics["test"]["n"] == expected["n"] == metrics["counts"]["test"]["happy"] + metrics["counts"]["test"]["sad"]
    for key in ("accuracy", "precision", "recall", "loss"):
        assert metrics["test"][key] == pytest.approx(expected[key], abs=1e-4), key

    # Both workers' test rows, once each (padding left out), in one file; the workers' own files removed.
    # Each row's score is the saved model's for the image at its path: no worker's rows shifted against its paths.
    test_rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/test_predictions.parquet")))
    paths = test_rows["path"].to_pylist()
    assert sorted(paths) == sorted(set(paths)) and test_rows.num_rows == expected["n"]
    local = {f"{data_uri}/{p.relative_to(odd_data).as_posix()}": p for p in odd_data.rglob("*") if p.is_file()}
    images = np.stack([decode_image(local[path].read_bytes()) for path in paths])
    np.testing.assert_allclose(test_rows["score"].to_numpy(), scores(model, images), rtol=0, atol=1e-5)
    assert test_rows["true_label"].to_pylist() == [local[path].parent.name for path in paths]
    for left in (".test-predictions", ".val-predictions"):
        assert not [k["Key"] for k in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/two-workers/{left}").get("Contents", [])]
    # metrics.json's test AUC is the exact one of these rows: every (sad, happy) pair, a tie counting half (not
    # Keras's AUC on 1,000 buckets, which once said 0.5 where these rows said 0.25).
    test_scores, test_sad = test_rows["score"].to_numpy(), np.array(test_rows["true_label"].to_pylist()) == "sad"
    assert 0 < test_sad.sum() < len(test_sad)  # seed 5: 5 happy, 3 sad
    pairs = test_scores[test_sad][:, None].astype(np.float64) - test_scores[~test_sad][None, :]
    assert metrics["test"]["auc"] == pytest.approx(np.mean((pairs > 0) + 0.5 * (pairs == 0)), abs=1e-12)
    assert metrics["test"] == json.loads(json.dumps(binary_metrics(test_scores, test_sad, metrics["threshold"]["value"])))

    history = storage.read_bytes(f"{output}/history.csv").decode().splitlines()
    assert history[0].startswith("epoch,loss,accuracy,val_loss,val_accuracy") and len(history) == 3
    rows = list(csv.DictReader(history))
    assert [int(row["images"]) for row in rows] == [29, 29]  # every real row stepped, every epoch
    assert storage.read_bytes(f"{output}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    events = storage.list_dir(f"{output}/tensorboard", recursive=True)
    assert any("tfevents" in e.base_name for e in events if e.is_file)
    check_threshold(metrics, output, model, odd_data, seed=5)
    check_final_model_has_no_optimizer(output, local_model, model, tmp_path, split_images(odd_data, "val", seed=5)[0])


def check_threshold(metrics: dict, output: str, model, data: Path, seed: int) -> None:
    """The threshold and the val metrics follow from val_predictions.parquet alone (the workers' exact scores of
    the last val pass, which are the saved model's scores of the val images); a chosen threshold splits the
    val scores (never a constant call); model.json holds it."""
    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/val_predictions.parquet")))
    val_scores, val_sad = rows["score"].to_numpy(), np.array(rows["true_label"].to_pylist()) == "sad"
    threshold = metrics["threshold"]
    assert threshold == json.loads(json.dumps(choose_threshold(val_scores, val_sad)))
    assert metrics["val"] == json.loads(json.dumps(binary_metrics(val_scores, val_sad, threshold["value"])))
    images, y = split_images(data, "val", seed)
    assert sorted(val_scores.tolist()) == pytest.approx(sorted(scores(model, images).tolist()), abs=1e-5)
    assert sorted(val_sad.tolist()) == sorted((y == 1).tolist())
    if threshold["chosen_on"] == "val":
        assert val_scores.min() < threshold["value"] <= val_scores.max(), threshold
    else:  # 2 epochs on 29 images: the val scores may not rank sad above happy
        assert threshold["value"] == 0.5 and threshold["reason"].startswith("val AUC"), threshold
    info = json.loads(storage.read_bytes(f"{output}/model.json"))
    histogram = info.pop("val_histogram")  # what a scoring run's drift is measured against: every val score once
    assert info == {"threshold": threshold["value"], "classes": ["happy", "sad"], "image_size": 256}
    assert sum(histogram["counts"]) == len(val_scores)
    assert open_model(output).threshold == threshold["value"]


def check_final_model_has_no_optimizer(output: str, final_path: Path, final, tmp_path: Path, images: np.ndarray) -> None:
    """model.keras holds the weights only; the last checkpoint, with Adam's state, scores the same images the same."""
    checkpoints = sorted(e.path for e in storage.list_dir(output) if e.base_name.startswith("checkpoint_") and not e.is_file)
    checkpoint_path = tmp_path / "checkpoint.keras"
    checkpoint_path.write_bytes(storage.read_bytes(f"s3://{checkpoints[-1]}/model.keras"))
    checkpointed = keras.models.load_model(checkpoint_path, safe_mode=True)
    assert getattr(final, "optimizer", None) is None and checkpointed.optimizer is not None
    assert final_path.stat().st_size < 16e6 and checkpoint_path.stat().st_size > 40e6  # ~15 MB against ~44 MB
    np.testing.assert_allclose(scores(final, images), scores(checkpointed, images), rtol=0, atol=1e-6)


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[str, int]]]:
    """(tag, step) of every scalar in each TensorBoard run folder (train, val), across all its event files."""
    import tensorflow as tf

    found = {}
    for folder in sorted((run_dir / "tensorboard").iterdir()):
        events = [e for f in sorted(folder.iterdir()) for e in tf.compat.v1.train.summary_iterator(str(f))]
        found[folder.name] = [(v.tag, e.step) for e in events for v in e.summary.value]
    return found


def add_new_image(data: Path, tmp_path: Path) -> None:
    """One face that is in no other copy of the data: new bytes, so a new file to the split."""
    extra = synth.make_data(tmp_path / "extra", n=2, seed=99)
    shutil.copy(next((extra / "happy").iterdir()), data / "happy" / "added-later.png")


def test_resume_continues_refuses_changed_flags_and_keeps_one_scalar_per_epoch(ray_session, tiny_folders, tmp_path):
    data, output = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_folders, data)
    base = {"data": (str(data),), "output": str(output), "epochs": 1, "batch_size": 8}
    run(TrainConfig(**base))
    assert json.loads((output / "config.json").read_text())["learning_rate"] == 0.001
    epoch_one = (output / "history.csv").read_text().splitlines()[1]
    with pytest.raises(UsageError, match="already holds a run"):
        run(TrainConfig(**base | {"epochs": 2}))

    # Each flag that would mix two runs is refused, naming it and both values, before any Ray work.
    changes = [
        ("data", (str(tiny_folders),), "--data", str(tiny_folders), str(data)),
        ("seed", 1, "--seed", "1", "0"),
        ("val_fraction", 0.3, "--val-fraction", "0.3", "0.2"),
        ("test_fraction", 0.2, "--test-fraction", "0.2", "0.1"),
        ("learning_rate", 0.5, "--learning-rate", "0.5", "0.001"),
        ("batch_size", 4, "--batch-size", "4", "8"),
        ("workers", 2, "--workers", "2", "1"),
    ]
    for field, value, flag, now, before in changes:
        with pytest.raises(UsageError) as refused:
            run(TrainConfig(**base | {field: value, "epochs": 2, "resume": True}))
        message = str(refused.value)
        assert message.startswith(f"{flag}:") and f"says {now}," in message and f"used {before};" in message, message
    result = run_cli("train", "--data", str(data), "--output", str(output), "--resume", "--seed", "7", timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--seed" in result.stderr, result.stderr

    # More epochs and more files are allowed: a file's split depends only on its bytes.
    add_new_image(data, tmp_path)
    result = run_cli("train", "--data", str(data), "--output", str(output), "--epochs", "2", "--batch-size", "8", "--resume", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from epoch 2 of 2 (the checkpoint holds 1 trained)" in result.stdout, result.stdout[-3000:]
    resumed = json.loads((output / "metrics.json").read_text())
    history = (output / "history.csv").read_text().splitlines()
    assert resumed["epochs"] == 2
    assert sum(sum(c.values()) for c in resumed["counts"].values()) == 25
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2"]
    assert history[1] == epoch_one  # epoch 1 came from the checkpoint, not trained again

    with pytest.raises(UsageError, match=r"^--epochs: this resume says 1, the run used 2; a resume may raise it"):
        run(TrainConfig(**base | {"epochs": 1, "resume": True}))

    scalars = tensorboard_scalars(output)
    assert sorted(step for tag, step in scalars["train"] if tag == "epoch/loss") == [1, 2]
    assert sorted(step for tag, step in scalars["val"] if tag == "epoch/accuracy") == [1, 2]


def test_undefined_metrics_are_null_absent_and_shown_as_na(ray_session, tiny_folders, tmp_path, capsys):
    output = tmp_path / "no-val"
    metrics = run(TrainConfig(data=(str(tiny_folders),), output=str(output), val_fraction=0, epochs=1, batch_size=8))
    # With seed 0, tiny_folders' test split holds one happy image and no sad one.
    assert metrics["counts"]["val"] == {"happy": 0, "sad": 0} and metrics["counts"]["test"] == {"happy": 1, "sad": 0}

    saved = json.loads((output / "metrics.json").read_text())
    assert all(saved["val"][name] is None for name in KERAS_METRICS) and saved["val"]["n"] == 0
    assert saved["val"]["undefined"]["accuracy"] == "no val split"
    assert saved["test"]["auc"] is None and saved["test"]["undefined"]["auc"] == "one class only"
    assert saved["test"]["recall"] is None and saved["test"]["undefined"]["recall"] == "no sad images"
    assert saved["test"]["accuracy"] in (0.0, 1.0) and saved["test"]["loss"] > 0 and saved["test"]["n"] == 1
    assert saved["threshold"] == {
        "value": 0.5, "chosen_on": None, "f1": None, "youden_j": None, "auc": None, "reason": "no val split",
    }

    (row,) = csv.DictReader((output / "history.csv").read_text().splitlines())
    assert row["val_loss"] == row["val_accuracy"] == "" and float(row["loss"]) > 0
    scalars = tensorboard_scalars(output)
    assert scalars["val"] == [] and ("epoch/loss", 1) in scalars["train"]
    out = capsys.readouterr().out
    assert "auc n/a (one class only)" in out and "auc 0.0000" not in out
    assert "threshold 0.500 (default: no val split)" in out


def test_one_class_data_is_refused_unless_allowed(ray_session, tiny_folders, tmp_path):
    data = tmp_path / "happy-only"
    shutil.copytree(tiny_folders / "happy", data / "happy")
    with pytest.raises(UsageError, match=r"^--data .*no usable sad images.*--allow-one-class"):
        run(TrainConfig(data=(str(data),), output=str(tmp_path / "run"), epochs=1, batch_size=8))
    allowed = _config(TrainConfig, build_parser().parse_args(["train", "--data", str(data), "--allow-one-class"]))
    prepared = prepare_datasets(allowed, sources.list_labelled([str(data)]))
    assert [sum(prepared.counts[s][c] for s in prepared.counts) for c in ("happy", "sad")] == [12, 0]


def test_a_train_split_of_one_class_is_refused_though_val_and_test_hold_both(ray_session, tmp_path):
    """24 happy images and 8 sad ones that all hash into val or test: the old guard counted the whole data set,
    found both classes and trained a constant "happy" model."""
    made = synth.make_data(tmp_path / "made", n=80, seed=21)
    data = tmp_path / "data"
    sad = [p for p in sorted((made / "sad").iterdir()) if split_of(p.read_bytes()) != "train"][:8]
    for path in sorted((made / "happy").iterdir())[:24] + sad:
        (data / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, data / path.parent.name / path.name)
    assert len(sad) == 8
    output = tmp_path / "run"
    result = run_cli("train", "--data", str(data), "--output", str(output), "--epochs", "1", "--batch-size", "8", timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0] == (
        f"happysad train: error: --data {data}: no usable sad images in the train split (8 in the val and test splits), "
        "so nothing to tell apart (--allow-one-class trains anyway)"
    )
    assert not output.exists()


def test_train_split_smaller_than_the_workers_is_refused(ray_session, tiny_folders, tmp_path):
    """One training image for two workers: the old code ran no step at all and still said done."""
    data = tmp_path / "one-train"
    kept_train = 0
    for path in sorted(p for p in tiny_folders.rglob("*") if p.is_file()):
        is_train = split_of(path.read_bytes()) == "train"
        if not is_train or (kept_train == 0 and path.parent.name == "sad"):
            kept_train += is_train
            (data / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, data / path.parent.name / path.name)
    assert kept_train == 1
    with pytest.raises(UsageError, match=r"^--workers 2: the train split has only 1 image"):
        run(TrainConfig(data=(str(data),), output=str(tmp_path / "run"), workers=2, epochs=1, batch_size=8))


@pytest.mark.parametrize("real, workers", [(1, 4), (2, 4), (3, 4), (4, 4), (5, 4), (1, 1), (3, 2)])
def test_padding_repeats_rows_until_every_worker_gets_an_equal_share(ray_session, real, workers):
    import ray

    ds = ray.data.from_items([{"label": i, "weight": 1.0} for i in range(real)])
    padded = pad_to_multiple(ds, real, workers)
    rows = padded.take_all()
    assert len(rows) == -(-real // workers) * workers
    assert sum(r["weight"] for r in rows) == real and {r["label"] for r in rows} == set(range(real))
    shares = padded.split(workers, equal=True)  # what Ray Train does: equal shares, remainder dropped
    assert [s.count() for s in shares] == [len(rows) // workers] * workers


def test_conflicting_copies_are_skipped_and_splits_padded_for_four_workers_cached_or_streamed(ray_session, tiny_folders, tmp_path):
    data = tmp_path / "conflict"
    shutil.copytree(tiny_folders, data)
    happy_train = next(p for p in sorted((data / "happy").iterdir()) if split_of(p.read_bytes()) == "train")
    shutil.copy(happy_train, data / "sad" / "same-bytes-other-label.png")

    config = TrainConfig(data=(str(data),), workers=4, batch_size=8)
    prepared = prepare_datasets(config, sources.list_labelled([str(data)]))
    assert prepared.cache == {"mode": "memory", "reason": prepared.cache["reason"]}
    assert prepared.cache["reason"].startswith("25 images (from the listing) decode to 5 MB, within 50% of the")
    assert prepared.skipped == {"conflicting_label": 2}
    assert prepared.real == {s: sum(prepared.counts[s].values()) for s in prepared.counts}
    assert sum(prepared.real.values()) == 23 and prepared.real["test"] == 1
    cached = {}
    for split, ds in prepared.datasets.items():
        rows = cached[split] = ds.take_all()
        assert len(rows) == prepared.rows[split] and len(rows) % 4 == 0, split
        assert sum(r["weight"] for r in rows) == prepared.real[split], split
    assert prepared.rows["test"] == 4  # 1 real row + 3 weight-0 copies: one per worker

    # Streamed (decoded again each epoch): the same rows, padding included, in the same order.
    streamed = prepare_datasets(replace(config, cache="none"), sources.list_labelled([str(data)]))
    assert streamed.cache == {"mode": "none", "reason": "--cache none"}
    assert (streamed.counts, streamed.skipped, streamed.rows) == (prepared.counts, prepared.skipped, prepared.rows)
    for split, ds in streamed.datasets.items():
        again = ds.take_all()
        assert [(r["label"], r["weight"]) for r in again] == [(r["label"], r["weight"]) for r in cached[split]], split
        assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(again, cached[split])), split


def test_cache_estimate_lists_class_folders_and_counts_shard_samples(ray_session, tiny_folders, tiny_shards):
    for root, how in ((tiny_folders, "from the listing"), (tiny_shards, "counted: WebDataset shards read, not decoded")):
        listing = sources.list_labelled([str(root)])
        assert count_images(listing, sources.labelled_images(listing)) == (24, how)
    with pytest.raises(UsageError, match=r"^--cache disk: expected one of auto, memory, none$"):
        TrainConfig(cache="disk")


@pytest.mark.parametrize(
    "flag, images, cpus, workers, mode, says",
    [
        ("auto", 100, 4, 1, "memory", "100 images (listed) decode to 20 MB, within 50% of the 300 MB object store"),
        ("auto", 1_700, 4, 1, "none", "1700 images (listed) decode to 334 MB, over 50% of the 300 MB object store: decoding every epoch"),
        ("auto", 1_700, 2, 2, "memory", "; cached anyway: the 2 workers hold all 2 CPUs, streaming needs one more"),
        ("auto", 1_700, 0, 2, "none", "decoding every epoch"),  # no CPU up yet: an autoscaling cluster will grow
        ("memory", 1_700, 4, 1, "memory", "--cache memory"),
        ("none", 100, 4, 1, "none", "--cache none"),
    ],
)
def test_cache_mode_follows_the_object_store_and_spare_cpus(flag, images, cpus, workers, mode, says):
    chosen = cache_mode(flag, images, "listed", 300e6, cpus, workers)
    assert chosen["mode"] == mode and says in chosen["reason"], chosen


def test_streaming_with_no_cpu_beside_the_workers_is_refused():
    """Its read and decode tasks would wait forever for a CPU (seen: a 2-worker run on 2 CPUs hung)."""
    with pytest.raises(UsageError, match=r"^--cache none: the 2 workers hold all 2 CPUs and streaming needs one more"):
        cache_mode("none", 10, "listed", 300e6, cpus=2, workers=2)


def test_default_run_directories_are_unique_and_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = [_new_run_dir() for _ in range(20)]  # same second, same millisecond even
    assert len(set(made)) == 20
    assert all(Path(m).is_dir() and Path(m).parent == (tmp_path / "runs").resolve() for m in made)


def test_output_at_a_bucket_root_is_refused(ray_session, s3, tiny_folders):
    s3.create_bucket(Bucket="happysad-root")
    with pytest.raises(UsageError, match=r"^--output s3://happysad-root: a bucket root"):
        run(TrainConfig(data=(str(tiny_folders),), output="s3://happysad-root", epochs=1, batch_size=8))


def test_killed_worker_restarts_from_checkpoint_and_run_completes(ray_session, odd_data, tmp_path):
    import ray.util.state

    output = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = ["--data", str(odd_data), "--output", str(output), "--workers", "2", "--epochs", "6", "--batch-size", "8"]
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen([sys.executable, "jobs/train.py", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_registered_checkpoint(output, proc, tmp_path / "train.log")
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
    assert result.stdout.count("epoch 1/1 ") == 1  # the job's workers' lines reach `ray job submit`, once
    assert json.loads((output / "metrics.json").read_text())["epochs"] == 1


def test_the_console_on_a_non_tty_is_a_few_lines_each_epoch_once(ray_session, tiny_folders, tmp_path):
    """What a user reads (stdout and stderr together, no TTY): the data, the cache choice, each epoch once,
    the summary. Ray's, Ray Data's and TensorFlow's own lines stay in Ray's log folder."""
    args = ["--data", str(tiny_folders), "--output", str(tmp_path / "run"), "--epochs", "3", "--batch-size", "8"]
    result = subprocess.run(
        [sys.executable, "jobs/train.py", *args], cwd=REPO, env=ray_session["env"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    lines = result.stdout.strip().splitlines()
    print(f"{len(lines)} lines:", *lines, sep="\n")
    assert result.returncode == 0 and len(lines) <= 12, result.stdout
    assert [sum(f"epoch {e}/3 " in line for line in lines) for e in (1, 2, 3)] == [1, 1, 1]
    assert lines[-1].startswith("done: test accuracy")
    for noise in ("absl", "oneDNN", "INFO", "Execution plan", "Reporting training result", "Warning"):
        assert not any(noise in line for line in lines), noise
