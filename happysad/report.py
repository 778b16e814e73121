"""The run directory's files: model.keras, model.json, metrics.json, history.csv, curves.png, tensorboard/,
val_predictions.parquet, test_predictions.parquet and report.html.

A metric that is undefined (no rows, or one class only) is None here, null in
JSON, an empty cell in history.csv, absent from curves and TensorBoard, and
printed as `n/a (reason)`: never a 0 that looks measured.

metrics.json's val and test metrics and the threshold come from the exact
scores the workers wrote (`worker_predictions`), through `happysad.metrics`;
the Keras metrics only make the per-epoch history and log line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile

import numpy as np
import pyarrow as pa

from happysad import storage

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "images_per_second", "images")
METRICS = ("loss", "accuracy", "precision", "recall", "auc")
# Fixed event file names: a resumed run replaces its files instead of adding a second copy of every scalar.
TENSORBOARD_FILES = {"train": "train/events.out.tfevents.happysad", "val": "val/events.out.tfevents.happysad"}
# Each split as the trained model scored it in the last pass over it: val's rows choose the threshold, test's make the report.
PREDICTIONS = {"val": "val_predictions.parquet", "test": "test_predictions.parquet"}
# Each Train worker's part of them (rank-N.parquet), merged by the driver, then removed.
WORKER_PREDICTIONS_DIRS = {"val": ".val-predictions", "test": ".test-predictions"}
WORKER_PREDICTIONS = pa.schema([("path", pa.string()), ("score", pa.float32()), ("true_label", pa.string())])


def defined_metrics(values: dict, split: str, happy: int, sad: int, predicted_sad: float) -> dict:
    """A split's measured `values` (the per-epoch Keras metrics) with each undefined one set to None and its
    reason under "undefined".

    `happy`, `sad`: the split's real images per class; `predicted_sad`: how many it called sad.
    """
    reasons = {}
    if happy + sad == 0:
        reasons = dict.fromkeys(METRICS, f"no {split} split")
    else:
        if happy == 0 or sad == 0:
            reasons["auc"] = "one class only"
        if sad == 0:
            reasons["recall"] = "no sad images"
        if predicted_sad == 0:
            reasons["precision"] = "no sad predictions"
    measured = {name: None if name in reasons else float(values[name]) for name in METRICS}
    return measured | {"n": happy + sad, "undefined": reasons}


def worker_predictions(output: str, split: str) -> pa.Table:
    """Every worker's rows of `split` (WORKER_PREDICTIONS: path, score, true_label), sorted by path; none: 0 rows."""
    import pyarrow.parquet as pq

    fs, parts = storage.filesystem(storage.join(output, WORKER_PREDICTIONS_DIRS[split]))
    try:
        rows = pq.read_table(parts, filesystem=fs, schema=WORKER_PREDICTIONS)
    except FileNotFoundError:  # an empty split: no worker wrote any
        return WORKER_PREDICTIONS.empty_table()
    return rows.sort_by("path")


def scores_and_sad(rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scores, bool sad) of prediction rows."""
    scores = rows["score"].to_numpy().astype(np.float32, copy=False)
    return scores, np.array(rows["true_label"].to_pylist()) == "sad"


def model_json(threshold: float, classes, image_size: int) -> bytes:
    """model.json beside model.keras: what `score` and `predict` need besides the weights."""
    return json.dumps({"threshold": threshold, "classes": list(classes), "image_size": image_size}, indent=2).encode()


def shown(metrics: dict, name: str) -> str:
    """A metric for a log line: 0.9512, or n/a with the reason."""
    value = metrics[name]
    return f"{value:.4f}" if value is not None else f"n/a ({metrics['undefined'][name]})"


def history_csv(history: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, HISTORY_COLUMNS, extrasaction="ignore")  # None -> empty cell
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue().encode()


def curves_png(history: list[dict]) -> bytes:
    """The seed's two plots: loss and accuracy per epoch, train vs val; undefined points are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for column, label in ((key, f"train {key}"), (f"val_{key}", f"val {key}")):
            points = [(row["epoch"], row[column]) for row in history if row.get(column) is not None]
            if points:
                ax.plot(*zip(*points), "o-", label=label)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def tensorboard_scalars(history: list[dict]) -> dict[str, list[tuple[str, int, float]]]:
    """(tag, step, value) per TensorBoard run (train/, val/); undefined values are left out."""
    runs = {"train": [], "val": []}
    for row in history:
        for run, prefix, extra in (("train", "", ("images_per_second",)), ("val", "val_", ())):
            for name in ("loss", "accuracy", *extra):
                value = row.get(prefix + name)
                if value is not None:
                    runs[run].append((f"epoch/{name}", row["epoch"], value))
    return runs


def tensorboard_files(history: list[dict]) -> dict[str, bytes]:
    """TensorBoard event files, one per run under a fixed name, written locally then returned as bytes."""
    import tensorflow as tf

    files = {}
    for run, scalars in tensorboard_scalars(history).items():
        with tempfile.TemporaryDirectory() as tmp:
            writer = tf.summary.create_file_writer(tmp)
            with writer.as_default():
                for tag, step, value in scalars:
                    tf.summary.scalar(tag, value, step=step)
            writer.close()
            (name,) = os.listdir(tmp)  # one writer, one event file
            with open(os.path.join(tmp, name), "rb") as f:
                files[TENSORBOARD_FILES[run]] = f.read()
    return files


def write_run(
    output: str, model_bytes: bytes, model_info: bytes, metrics: dict, history: list[dict], tensorboard: dict[str, bytes],
    predictions: dict[str, pa.Table],
) -> None:
    """Write the run directory; `predictions`: each split's worker rows (`worker_predictions`), which
    metrics.json's numbers were computed from."""
    # model.json first: whoever finds model.keras also finds its threshold.
    storage.write_bytes(storage.join(output, "model.json"), model_info)
    storage.write_bytes(storage.join(output, "model.keras"), model_bytes)
    storage.write_bytes(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2).encode())
    storage.write_bytes(storage.join(output, "history.csv"), history_csv(history))
    storage.write_bytes(storage.join(output, "curves.png"), curves_png(history))
    for name, data in tensorboard.items():
        storage.write_bytes(storage.join(output, "tensorboard", name), data)
    from happysad import evaluate, score  # Ray and Keras in the driver only: workers import this module too

    # Last: the splits' predictions, labelled at the threshold in model.json written above, and the page of the test split.
    model = score.open_model(storage.join(output, "model.keras"))
    labelled = evaluate.write_predictions(output, predictions, model)
    storage.write_bytes(storage.join(output, "report.html"), evaluate.run_page(output, labelled["test"], model, metrics, history))
