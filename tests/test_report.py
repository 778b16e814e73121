"""Run-directory files from plain rows, no Ray: undefined metrics are None / n/a, never a measured-looking 0; the workers' scores.

The threshold's choice is tested in test_metrics.py."""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from happysad.report import (
    METRICS, WORKER_PREDICTIONS, WORKER_PREDICTIONS_DIRS, curves_png, defined_metrics, history_csv, model_json, scores_and_sad, shown,
    tensorboard_scalars, worker_predictions,
)

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


def test_worker_predictions_are_merged_sorted_and_empty_when_none_were_written(tmp_path):
    """Each worker's rows of a split, one file per rank, read back as one table; the split that no worker
    wrote (an empty split) is 0 rows, not an error."""
    for rank, rows in enumerate([[("b.png", 0.75, "sad"), ("d.png", 0.125, "happy")], [("a.png", 0.5, "happy")]]):
        table = pa.table(dict(zip(("path", "score", "true_label"), map(list, zip(*rows)))), schema=WORKER_PREDICTIONS)
        folder = tmp_path / WORKER_PREDICTIONS_DIRS["val"]
        folder.mkdir(exist_ok=True)
        pq.write_table(table, folder / f"rank-{rank}.parquet")
    merged = worker_predictions(str(tmp_path), "val")
    assert merged.schema == WORKER_PREDICTIONS and merged["path"].to_pylist() == ["a.png", "b.png", "d.png"]
    scores, sad = scores_and_sad(merged)
    assert scores.dtype == np.float32 and scores.tolist() == [0.5, 0.75, 0.125] and sad.tolist() == [False, True, False]
    empty = worker_predictions(str(tmp_path), "test")
    assert empty.num_rows == 0 and [len(a) for a in scores_and_sad(empty)] == [0, 0]


def test_model_json_names_threshold_classes_and_size():
    assert json.loads(model_json(0.42, ("happy", "sad"), 256)) == {"threshold": 0.42, "classes": ["happy", "sad"], "image_size": 256}
