"""The run directory's files: model.keras, model.json (with the validation score histogram), metrics.json, history.csv, curves.png, tensorboard/,
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

import pyarrow as pa


HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "images_per_second", "images")
# Fixed event file names: a resumed run replaces its files instead of adding a second copy of every scalar.
TENSORBOARD_FILES = {"train": "train/events.out.tfevents.happysad", "val": "val/events.out.tfevents.happysad"}
# Each split as the trained model scored it in the last pass over it: val's rows choose the threshold, test's make the report.
PREDICTIONS = {"val": "val_predictions.parquet", "test": "test_predictions.parquet"}
# Each Train worker's part of them (rank-N.parquet), merged by the driver, then removed.
WORKER_PREDICTIONS_DIRS = {"val": ".val-predictions", "test": ".test-predictions"}
WORKER_PREDICTIONS = pa.schema([("path", pa.string()), ("score", pa.float32()), ("true_label", pa.string())])


def model_json(threshold: float, classes, image_size: int, val_histogram=None) -> bytes:
    """model.json beside model.keras: what `score` and `predict` need besides the weights, and the validation
    split's score histogram (`metrics.score_histogram`: counts in equal bins on [0, 1]) that a scoring run's
    drift is measured against (`val_histogram`, absent for models trained before it was kept)."""
    info = {"threshold": threshold, "classes": list(classes), "image_size": image_size}
    if val_histogram is not None:
        counts = [int(c) for c in val_histogram]
        info["val_histogram"] = {"range": [0.0, 1.0], "bins": len(counts), "n": sum(counts), "counts": counts}
    return json.dumps(info, indent=2).encode()


def val_histogram(model_info: dict) -> list[int] | None:
    """model.json's validation score histogram (counts), or None if the model was trained without one."""
    kept = model_info.get("val_histogram")
    counts = kept.get("counts") if isinstance(kept, dict) else None
    return [int(c) for c in counts] if isinstance(counts, list) and counts else None


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
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for column, label in ((key, f"train {key}"), (f"val_{key}", f"val {key}")):
            points = [(row["epoch"], row[column]) for row in history if row.get(column) is not None]
            if points:
                ax.plot(*zip(*points), "o-", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.25
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


