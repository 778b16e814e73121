"""happysad.metrics from hand-computed values: exact AUC (ties half), one rule at the threshold in float32,
undefined metrics with a reason, and a threshold that always splits the val scores (else 0.5 and why)."""

import json
import math

import numpy as np
import pytest

from happysad.metrics import (
    DEFAULT_THRESHOLD, KERAS_METRICS, binary_metrics, called_sad, choose_threshold, curves, defined_metrics, log_losses, rank_auc,
    separating_value, shown,
)

F32 = np.float32


def labelled(happy, sad):
    """(scores, is-sad) of the given happy and sad scores, as float32 as the model gives them."""
    return np.array([*happy, *sad], F32), np.array([False] * len(happy) + [True] * len(sad))


# --- exact AUC: the Mann-Whitney U statistic, a tied (sad, happy) pair counting half ------------------------------

AUC_CASES = {
    # name: (happy scores, sad scores, AUC by hand: sad-above-happy pairs / all pairs)
    "tie across classes counts half": ([0.5, 0.2], [0.5, 0.9], 3.5 / 4),
    "all tied": ([0.3, 0.3], [0.3, 0.3], 0.5),
    "one pair out of order": ([0.1, 0.4], [0.35, 0.8], 3 / 4),
    "separated": ([0.1, 0.2], [0.8, 0.9], 1.0),
    "reversed": ([0.8, 0.9], [0.1, 0.2], 0.0),
    # Keras's AUC buckets scores on 1,000 thresholds: every score below 0.001 fell in one bucket (AUC 0.5 there).
    "confident, all below 0.001": ([1e-6, 5e-6, 2e-5], [1e-4, 3e-4, 8e-4], 1.0),
    "below 0.001, one pair out of order": ([1e-6, 4e-4], [3e-4, 8e-4], 3 / 4),
}


@pytest.mark.parametrize("happy, sad, expected", AUC_CASES.values(), ids=AUC_CASES.keys())
def test_rank_auc_is_exact(happy, sad, expected):
    scores, is_sad = labelled(happy, sad)
    assert rank_auc(scores, is_sad) == pytest.approx(expected, abs=1e-12)
    assert binary_metrics(scores, is_sad, 0.5)["auc"] == pytest.approx(expected, abs=1e-12)


# --- metrics at a threshold -----------------------------------------------------------------------------------

METRIC_CASES = {
    # name: (happy, sad, threshold, {metric: value by hand}, confusion [[tn, fp], [fn, tp]])
    "one sad missed": (
        [0.1, 0.4], [0.35, 0.8], 0.5,
        {"accuracy": 3 / 4, "precision": 1.0, "recall": 1 / 2, "f1": 2 / 3, "auc": 3 / 4}, [[2, 0], [1, 1]],
    ),
    "a score exactly at the threshold is sad": (
        [0.25], [0.5], 0.5, {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "auc": 1.0}, [[1, 0], [0, 1]],
    ),
    "one false alarm": (
        [0.1, 0.6], [0.7, 0.9], 0.5,
        {"accuracy": 3 / 4, "precision": 2 / 3, "recall": 1.0, "f1": 4 / 5, "auc": 1.0}, [[1, 1], [0, 2]],
    ),
}


@pytest.mark.parametrize("happy, sad, threshold, expected, matrix", METRIC_CASES.values(), ids=METRIC_CASES.keys())
def test_binary_metrics_by_hand(happy, sad, threshold, expected, matrix):
    result = binary_metrics(*labelled(happy, sad), threshold)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-12), name
    assert result["confusion_matrix"]["matrix"] == matrix and result["undefined"] == {}
    assert result["n"] == len(happy) + len(sad) and result["threshold"] == threshold
    assert json.loads(json.dumps(result)) == result  # plain JSON: metrics.json takes it as it is


def test_the_threshold_is_compared_in_float32_as_score_labels():
    """A threshold a hair above a float32 score rounds onto it in float32: `score` calls that score sad, so
    must every metric (the old metrics compared in float64 and called it happy)."""
    from happysad.score import decided_labels

    score = F32(0.7)
    threshold = float(score) + 1e-12  # not a float32 value; float32(threshold) == score
    scores, is_sad = np.array([score, F32(0.2)], F32), np.array([True, False])
    assert list(decided_labels(scores, threshold)) == ["sad", "happy"]
    assert list(called_sad(scores, threshold)) == [True, False]
    result = binary_metrics(scores, is_sad, threshold)
    assert result["confusion_matrix"]["matrix"] == [[1, 0], [0, 1]] and result["accuracy"] == 1.0
    at = curves(scores, is_sad, threshold)["at"]
    assert (at["tpr"], at["fpr"]) == (1.0, 0.0)


UNDEFINED_CASES = {
    # name: (happy, sad, threshold, empty reason, {metric: reason}, accuracy)
    "no rows": ([], [], 0.5, "no labelled images scored", dict.fromkeys(
        ("accuracy", "precision", "recall", "f1", "auc", "loss"), "no labelled images scored"), None),
    "no rows in a training split": ([], [], 0.5, "no val split", dict.fromkeys(
        ("accuracy", "precision", "recall", "f1", "auc", "loss"), "no val split"), None),
    "happy only, none called sad": ([0.1, 0.2, 0.3], [], 0.5, None, {
        "auc": "one class only", "recall": "no sad images", "precision": "no sad predictions",
        "f1": "no sad images and no sad predictions"}, 1.0),
    "sad only": ([], [0.6, 0.2], 0.5, None, {"auc": "one class only"}, 0.5),
    "none called sad": ([0.1], [0.2], 0.5, None, {"precision": "no sad predictions"}, 0.5),
}


@pytest.mark.parametrize("happy, sad, threshold, empty, reasons, accuracy", UNDEFINED_CASES.values(), ids=UNDEFINED_CASES.keys())
def test_undefined_metrics_are_null_with_a_reason(happy, sad, threshold, empty, reasons, accuracy):
    result = binary_metrics(*labelled(happy, sad), threshold, **({"empty": empty} if empty else {}))
    assert result["undefined"] == reasons
    assert all(result[name] is None for name in reasons) and result["accuracy"] == accuracy


LOSS_CASES = {
    "a coin flip costs ln 2": (0.5, True, math.log(2)),
    "a certain right call costs ~1e-7 (clipped)": (0.0, False, -math.log(1 - 1e-7)),
    "a certain wrong call costs ln 1e7 (clipped, finite)": (0.0, True, -math.log(1e-7)),
    "sad at 0.8": (0.8, True, -math.log(0.8)),
}


@pytest.mark.parametrize("score, is_sad, expected", LOSS_CASES.values(), ids=LOSS_CASES.keys())
def test_log_loss_by_hand(score, is_sad, expected):
    assert log_losses(np.array([score], F32), np.array([is_sad]))[0] == pytest.approx(expected, rel=1e-6)


# --- the threshold ---------------------------------------------------------------------------------------------

CHOSEN_CASES = {
    # name: (happy, sad, threshold by hand, Youden's J, F1 at it, the gap it lies in)
    # The demo set's case: separated val scores, the midpoint of the gap between the classes.
    "separated: the gap's midpoint (the demo's 0.4655)": ([0.02, 0.2, 0.4], [0.531, 0.9], 0.4655, 1.0, 1.0, (0.4, 0.531)),
    "separated, three each": ([0.1, 0.3, 0.35], [0.71, 0.8, 0.9], 0.53, 1.0, 1.0, (0.35, 0.71)),
    # Keras's buckets saw one tie below 0.001 and called every image sad (threshold 0); the exact scores separate.
    "confident, all below 0.001": ([1e-6, 5e-6, 2e-5], [1e-4, 3e-4, 8e-4], 6e-5, 1.0, 1.0, (2e-5, 1e-4)),
    # J by cut (>= 0.3, 0.4, 0.6, 0.7, 0.8): 1/3, 0, 1/3, 2/3, 1/3. F1 there: 4/5.
    "overlapping: the best J": ([0.1, 0.4, 0.6], [0.3, 0.7, 0.8], 0.65, 2 / 3, 4 / 5, (0.6, 0.7)),
    # Max F1 was "everything sad" (8/9, threshold below 0.1); J: -1/4 at >= 0.2, 3/4 at >= 0.5, 1/2 at >= 0.6, 1/4 at >= 0.7.
    "mostly sad: never a constant call": ([0.2], [0.1, 0.5, 0.6, 0.7], 0.35, 3 / 4, 6 / 7, (0.2, 0.5)),
    # J 1/2 at >= 0.3 and at >= 0.9 (0 between): the middle of the tied cuts, counted by index, is the upper one.
    "equal J: the middle of the tie": ([0.1, 0.5], [0.3, 0.9], 0.7, 1 / 2, 2 / 3, (0.5, 0.9)),
}


@pytest.mark.parametrize("happy, sad, value, j, f1, gap", CHOSEN_CASES.values(), ids=CHOSEN_CASES.keys())
def test_threshold_splits_the_val_scores_at_the_best_youden_j(happy, sad, value, j, f1, gap):
    scores, is_sad = labelled(happy, sad)
    chosen = choose_threshold(scores, is_sad)
    assert chosen["value"] == pytest.approx(value, rel=1e-6) and chosen["chosen_on"] == "val"
    assert chosen["youden_j"] == pytest.approx(j) and chosen["f1"] == pytest.approx(f1)
    assert chosen["gap"] == [float(F32(gap[0])), float(F32(gap[1]))]
    assert chosen["auc"] == rank_auc(scores, is_sad) and "reason" not in chosen
    # Never a constant classifier: above the lowest val score, at most the highest.
    assert scores.min() < chosen["value"] <= scores.max()
    assert F32(chosen["value"]) == chosen["value"]  # a float32 value: the same threshold in float32 and float64
    at = binary_metrics(scores, is_sad, chosen["value"])
    assert at["f1"] == pytest.approx(f1) and at["recall"] - at["confusion_matrix"]["matrix"][0][1] / len(happy) == pytest.approx(j)


def test_confident_val_scores_give_auc_1_and_a_threshold_that_separates():
    scores, is_sad = labelled([1e-6, 5e-6, 2e-5, 3e-5], [1e-4, 3e-4, 8e-4, 9e-4])
    chosen = choose_threshold(scores, is_sad)
    assert chosen["auc"] == 1.0
    result = binary_metrics(scores, is_sad, chosen["value"])
    assert result["accuracy"] == 1.0 and result["auc"] == 1.0  # no image misclassified


FALLBACK_CASES = {
    # name: (happy, sad, reason, val AUC)
    "no val split": ([], [], "no val split", None),
    "happy only": ([0.1, 0.2], [], "one class only in the val split", None),
    "sad only": ([], [0.0, 0.0], "one class only in the val split", None),
    # The 10-image run: 1 happy, 3 sad, AUC 1/3; max F1 called everything sad (0.018, below every score).
    "weak: val AUC 1/3": ([0.6], [0.2, 0.3, 0.7], "val AUC 0.333 is not above 0.5", 1 / 3),
    "all tied: AUC 1/2": ([0.4, 0.4], [0.4, 0.4], "val AUC 0.500 is not above 0.5", 0.5),
    "reversed": ([0.8, 0.9], [0.1, 0.2], "val AUC 0.000 is not above 0.5", 0.0),
}


@pytest.mark.parametrize("happy, sad, reason, auc", FALLBACK_CASES.values(), ids=FALLBACK_CASES.keys())
def test_threshold_falls_back_to_half_with_the_reason(happy, sad, reason, auc):
    chosen = choose_threshold(*labelled(happy, sad))
    assert chosen["value"] == DEFAULT_THRESHOLD == 0.5 and chosen["chosen_on"] is None
    assert chosen["reason"].startswith(reason) and chosen["f1"] is None and chosen["youden_j"] is None
    assert chosen["auc"] == (pytest.approx(auc) if auc is not None else None)
    assert json.loads(json.dumps(chosen)) == chosen


@pytest.mark.parametrize("below", [F32(0.5), F32(1e-30), F32(0.46551725), F32(0.9999999)])
def test_neighbouring_float32_scores_still_get_a_threshold_between_them(below):
    above = np.nextafter(below, F32(1))  # no float32 strictly between: the threshold is `above` itself
    value = separating_value(below, above)
    assert below < value <= above and F32(value) == value
    assert list(called_sad(np.array([below, above], F32), value)) == [False, True]
    chosen = choose_threshold(np.array([below, above], F32), np.array([False, True]))
    assert chosen["value"] == value and chosen["youden_j"] == 1.0


def brute_force(scores: np.ndarray, is_sad: np.ndarray) -> tuple[float, float]:
    """(best J, best F1) over every threshold that splits the scores, tried one by one."""
    distinct = np.unique(scores)
    best_j = best_f1 = -1.0
    for t in distinct[1:]:
        called = scores >= t
        tp, fp = np.sum(called & is_sad), np.sum(called & ~is_sad)
        best_j = max(best_j, tp / is_sad.sum() - fp / (~is_sad).sum())
        best_f1 = max(best_f1, 2 * tp / (tp + fp + is_sad.sum()))
    return best_j, best_f1


@pytest.mark.parametrize("seed", range(40))
def test_random_val_sets_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_happy, n_sad = rng.integers(1, 30, size=2)
    coarse = seed % 2  # half the sets on a coarse grid: many ties
    happy, sad = (rng.beta(2, 5, n_happy), rng.beta(2 + seed % 5, 2, n_sad))
    if coarse:
        happy, sad = np.round(happy, 1), np.round(sad, 1)
    scores, is_sad = labelled(happy, sad)
    chosen = choose_threshold(scores, is_sad)
    if rank_auc(scores, is_sad) <= 0.5:
        assert chosen["value"] == 0.5 and chosen["reason"].startswith("val AUC")
        return
    best_j, _ = brute_force(scores, is_sad)
    assert scores.min() < chosen["value"] <= scores.max() and F32(chosen["value"]) == chosen["value"]
    at = binary_metrics(scores, is_sad, chosen["value"])
    (tn, fp), (fn, tp) = at["confusion_matrix"]["matrix"]
    assert tp / (tp + fn) - fp / (fp + tn) == pytest.approx(best_j) == pytest.approx(chosen["youden_j"])


@pytest.mark.parametrize("seed", range(20))
def test_on_separable_val_sets_youden_j_and_f1_pick_the_same_gap(seed):
    rng = np.random.default_rng(100 + seed)
    happy = rng.uniform(0, 0.5, rng.integers(1, 20))
    sad = rng.uniform(0.5, 1, rng.integers(1, 20))
    scores, is_sad = labelled(happy, sad)
    chosen = choose_threshold(scores, is_sad)
    assert chosen["gap"] == [float(F32(happy.max())), float(F32(sad.min()))]
    assert chosen["youden_j"] == 1.0 and chosen["f1"] == 1.0 == brute_force(scores, is_sad)[1]


# --- a training epoch's Keras metrics: undefined ones are None / n/a, never a measured-looking 0 ---

MEASURED = {"loss": 0.5, "accuracy": 0.75, "precision": 0.0, "recall": 0.0, "auc": 0.0}


def test_an_empty_split_has_no_metrics_and_says_why():
    test = defined_metrics(MEASURED, "test", happy=0, sad=0, predicted_sad=0)
    assert test["n"] == 0 and all(test[name] is None for name in KERAS_METRICS)
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
