"""Run-directory files from plain rows, no Ray: undefined values are empty cells and absent from TensorBoard."""

import csv
import json

from happysad.run_files import curves_png, history_csv, model_json, tensorboard_scalars

HISTORY = [
    {"epoch": 1, "loss": 0.7, "accuracy": 0.5, "val_loss": None, "val_accuracy": None, "images_per_second": 9.0, "images": 20},
    {"epoch": 2, "loss": 0.6, "accuracy": 0.6, "val_loss": None, "val_accuracy": None, "images_per_second": 9.5, "images": 20},
]


def test_undefined_values_are_empty_cells_and_absent_from_tensorboard():
    rows = list(csv.DictReader(history_csv(HISTORY).decode().splitlines()))
    assert [(r["val_loss"], r["val_accuracy"], r["images"]) for r in rows] == [("", "", "20")] * 2
    scalars = tensorboard_scalars(HISTORY)
    assert scalars["val"] == []
    assert [(tag, step) for tag, step, _ in scalars["train"] if tag == "epoch/loss"] == [("epoch/loss", 1), ("epoch/loss", 2)]
    assert curves_png(HISTORY)[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_json_names_threshold_classes_and_size():
    assert json.loads(model_json(0.42, ("happy", "sad"), 256)) == {"threshold": 0.42, "classes": ["happy", "sad"], "image_size": 256}
