"""Run-directory files from plain rows, no Ray: undefined metrics are None / n/a, never a measured-looking 0."""

import csv

from happysad.report import METRICS, curves_png, defined_metrics, history_csv, shown, tensorboard_scalars

MEASURED = {"loss": 0.5, "accuracy": 0.75, "precision": 0.0, "recall": 0.0, "auc": 0.0}


def test_an_empty_split_has_no_metrics_and_says_why():
    test = defined_metrics(MEASURED, "test", happy=0, sad=0, predicted_sad=0)
    assert test["n"] == 0 and all(test[name] is None for name in METRICS)
    assert shown(test, "accuracy") == "n/a (no test split)" and shown(test, "auc") == "n/a (no test split)"


def test_one_class_leaves_auc_and_recall_undefined_but_keeps_accuracy():
    test = defined_metrics(MEASURED, "test", happy=3, sad=0, predicted_sad=0)
    assert test["accuracy"] == 0.75 and test["loss"] == 0.5 and test["n"] == 3
    assert test["undefined"] == {"auc": "one class only", "recall": "no sad images", "precision": "no sad predictions"}
    assert shown(test, "auc") == "n/a (one class only)" and shown(test, "accuracy") == "0.7500"


def test_a_real_zero_stays_zero():
    """Sad images present and some predicted sad, all wrong: precision and recall are measured zeros."""
    val = defined_metrics(MEASURED, "val", happy=2, sad=2, predicted_sad=1)
    assert val["precision"] == 0.0 and val["recall"] == 0.0 and val["auc"] == 0.0 and val["undefined"] == {}


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
