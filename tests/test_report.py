"""Run-directory files from plain rows, no Ray: undefined metrics are None / n/a, never a measured-looking 0; the threshold."""

import csv
import json

import numpy as np

from happysad.report import (
    METRICS, choose_threshold, curves_png, defined_metrics, history_csv, model_json, shown, tensorboard_scalars,
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


def confusion(thresholds, happy_scores, sad_scores):
    """(tp, fp, fn) per threshold, a score above it counting as sad: what Keras' AUC metric accumulates."""
    happy, sad = np.asarray(happy_scores)[:, None], np.asarray(sad_scores)[:, None]
    return (sad > thresholds).sum(0), (happy > thresholds).sum(0), (sad <= thresholds).sum(0)


def test_threshold_is_the_best_f1_and_the_middle_of_a_tie():
    grid = np.linspace(0, 1, 11)
    # One sad image scores below a happy one: F1 is 0.75 keeping it (t 0.1-0.2), 0.8 giving it up (t 0.4-0.7).
    happy, sad = [0.05, 0.25, 0.35], [0.3, 0.75, 0.95]
    chosen = choose_threshold(grid, *confusion(grid, happy, sad), happy=3, sad=3)
    f1 = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in zip(*confusion(grid, happy, sad))]
    assert chosen == {"value": grid[6], "chosen_on": "val", "f1": max(f1)} and max(f1) == 0.8
    # Perfectly separated: F1 is 1 from 0.4 to 0.7; the middle, not the edge next to a class.
    separated = choose_threshold(grid, *confusion(grid, [0.1, 0.3, 0.35], [0.71, 0.8, 0.9]), happy=3, sad=3)
    assert separated["f1"] == 1.0 and separated["value"] == grid[6]


def test_threshold_stays_half_without_a_usable_val_split():
    grid = np.linspace(0, 1, 11)
    counts = confusion(grid, [0.1, 0.2], [])
    assert choose_threshold(grid, *counts, happy=2, sad=0) == {
        "value": 0.5, "chosen_on": None, "f1": None, "reason": "one class only in the val split"
    }
    assert choose_threshold(grid, *confusion(grid, [], []), happy=0, sad=0)["reason"] == "no val split"


def test_model_json_names_threshold_classes_and_size():
    assert json.loads(model_json(0.42, ("happy", "sad"), 256)) == {"threshold": 0.42, "classes": ["happy", "sad"], "image_size": 256}
