"""The run directory's files: model.keras, metrics.json, history.csv, curves.png, tensorboard/."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile

from happysad import storage

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "images_per_second")


def history_csv(history: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue().encode()


def curves_png(history: list[dict]) -> bytes:
    """The seed's two plots: loss and accuracy per epoch, train vs val."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [row[key] for row in history], "o-", label=f"train {key}")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "o-", label=f"val {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def tensorboard_files(history: list[dict]) -> dict[str, bytes]:
    """TensorBoard event files (train/ and val/ runs), written locally then returned as bytes."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        for run in ("train", "val"):
            writer = tf.summary.create_file_writer(os.path.join(tmp, run))
            with writer.as_default():
                for row in history:
                    prefix = "val_" if run == "val" else ""
                    tf.summary.scalar("epoch/loss", row[f"{prefix}loss"], step=row["epoch"])
                    tf.summary.scalar("epoch/accuracy", row[f"{prefix}accuracy"], step=row["epoch"])
                    if run == "train":
                        tf.summary.scalar("epoch/images_per_second", row["images_per_second"], step=row["epoch"])
            writer.close()
        files = {}
        for root, _, names in os.walk(tmp):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, tmp)] = f.read()
    return files


def write_run(output: str, model_bytes: bytes, metrics: dict, history: list[dict], tensorboard: dict[str, bytes]) -> None:
    storage.write_bytes(storage.join(output, "model.keras"), model_bytes)
    storage.write_bytes(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2).encode())
    storage.write_bytes(storage.join(output, "history.csv"), history_csv(history))
    storage.write_bytes(storage.join(output, "curves.png"), curves_png(history))
    for name, data in tensorboard.items():
        storage.write_bytes(storage.join(output, "tensorboard", name), data)
