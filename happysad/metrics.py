"""Binary-classifier metrics from exact scores, sad = positive: numpy in, dicts and floats out.

No Ray, Keras or I/O: training (metrics.json, model.json's threshold),
`evaluate` (evaluation.json) and the report pages all call these, on the
scores the model gave (float32 P(sad)), never on a bucketed histogram.

One rule on every path: a score at or above the threshold is sad, compared in
float32 (`called_sad`), as `score.decided_labels` compares a float32 score
with a Python float. A threshold chosen here is itself a float32 value, so
it means the same in float32 and float64.
"""

from __future__ import annotations

import numpy as np

from happysad.model import CLASSES  # negative, positive: labels 0 and 1

EPSILON = 1e-7  # Keras's clip for log loss: a score of exactly 0 or 1 costs a large, finite loss
DEFAULT_THRESHOLD = 0.5  # kept when validation cannot choose one
NAMES = ("accuracy", "precision", "recall", "f1", "auc", "loss")
KERAS_METRICS = ("loss", "accuracy", "precision", "recall", "auc")  # what a training epoch logs, from Keras's metrics


def called_sad(scores, threshold: float) -> np.ndarray:
    """The rule: score >= threshold, in float32 (the scores' own precision)."""
    return np.asarray(scores, np.float32) >= np.float32(threshold)


def binary_metrics(scores, sad, threshold: float, empty: str = "no labelled images scored") -> dict:
    """Accuracy, precision, recall, F1 at `threshold`, exact rank AUC and log loss, and the confusion matrix.

    An undefined metric is None, with its reason under "undefined"; `empty` is
    the reason when there are no rows at all.
    """
    scores, sad = np.asarray(scores, np.float32), np.asarray(sad, bool)
    predicted = called_sad(scores, threshold)
    tp, fp = int(np.sum(predicted & sad)), int(np.sum(predicted & ~sad))
    fn, tn = int(np.sum(~predicted & sad)), int(np.sum(~predicted & ~sad))
    n, positives = len(scores), tp + fn
    reasons = undefined(n, positives, tp + fp, empty)
    values = {
        "accuracy": (tp + tn) / n if n else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / positives if positives else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None,
        "auc": rank_auc(scores, sad) if 0 < positives < n else None,
        "loss": float(np.mean(log_losses(scores, sad))) if n else None,
    }
    values = {k: None if k in reasons else v for k, v in values.items()}
    matrix = {"labels": list(CLASSES), "rows": "true", "columns": "predicted", "matrix": [[tn, fp], [fn, tp]]}
    return {"n": n, "threshold": float(threshold), **values, "undefined": reasons, "confusion_matrix": matrix}


def undefined(n: int, sad: int, predicted_sad: int, empty: str = "no labelled images scored") -> dict:
    """{metric: why it is undefined} for `n` rows, `sad` of them sad, `predicted_sad` called sad."""
    if n == 0:
        return dict.fromkeys(NAMES, empty)
    reasons = {}
    if sad in (0, n):
        reasons["auc"] = "one class only"
    if sad == 0:
        reasons["recall"] = "no sad images"
    if predicted_sad == 0:
        reasons["precision"] = "no sad predictions"
    if sad == 0 and predicted_sad == 0:
        reasons["f1"] = "no sad images and no sad predictions"
    return reasons


def log_losses(scores, sad) -> np.ndarray:
    """Binary cross-entropy per row, with Keras's clipping."""
    p = np.clip(np.asarray(scores, np.float64), EPSILON, 1 - EPSILON)
    return -np.where(np.asarray(sad, bool), np.log(p), np.log(1 - p))


def rank_auc(scores, sad) -> float:
    """Exact ROC AUC, the Mann-Whitney U statistic: tied scores share their mean rank (a tied pair counts half).

    Both classes must be present (else it is undefined: see `binary_metrics`).
    """
    scores, sad = np.asarray(scores, np.float32), np.asarray(sad, bool)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based mean rank of each tie group
    positives = int(np.sum(sad))
    negatives = len(scores) - positives
    return float((ranks[sad].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def curves(scores, sad, threshold: float) -> dict:
    """ROC (fpr, tpr) and precision-recall points at every distinct score, and the point at `threshold`."""
    scores, sad = np.asarray(scores, np.float32), np.asarray(sad, bool)
    if not len(scores) or sad.all() or not sad.any():
        return {}
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], sad[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each tie group: one point per score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    positives, negatives = int(y.sum()), int((~y).sum())
    predicted = called_sad(scores, threshold)
    at_tp, at_fp = int(np.sum(predicted & sad)), int(np.sum(predicted & ~sad))
    return {
        "fpr": np.r_[0, fp / negatives], "tpr": np.r_[0, tp / positives],
        "recall": tp / positives, "precision": tp / (tp + fp), "base_rate": positives / len(s),
        "at": {"fpr": at_fp / negatives, "tpr": at_tp / positives, "precision": at_tp / (at_tp + at_fp) if at_tp + at_fp else None},
    }


def choose_threshold(scores, sad) -> dict:
    """The decision threshold from the val split's exact scores, as metrics.json's "threshold".

    Only thresholds that split the val scores are candidates: one in a gap
    between two neighbouring distinct scores, so that at least one val image
    is called each way (at or below the lowest score everything is sad, above
    the highest everything is happy: a constant classifier). Among them, the
    one with the highest Youden's J (TPR - FPR, computed in integers: ties are
    exact); among equal J, the middle one. The value is the midpoint of its
    gap, as a float32 strictly above the lower score and at most the upper
    one. On separable scores J is 1 at the gap between the classes only, the
    same gap the best F1 picks.

    DEFAULT_THRESHOLD, with the reason, when the scores cannot choose: no val
    split, one class only, or an exact val AUC of 0.5 or less (the scores do
    not rank sad above happy, so no threshold separates the classes).
    """
    scores, sad = np.asarray(scores, np.float32), np.asarray(sad, bool)
    n, positives = len(scores), int(np.sum(sad))
    negatives = n - positives
    if n == 0:
        return _fallback("no val split")
    if positives in (0, n):
        return _fallback("one class only in the val split")
    auc = rank_auc(scores, sad)
    if auc <= 0.5:
        return _fallback(f"val AUC {auc:.3f} is not above 0.5: the val scores do not rank sad above happy", auc)
    distinct, group = np.unique(scores, return_inverse=True)  # ascending
    # Cut k (1 <= k < len(distinct)) calls sad every score >= distinct[k]: tp and fp per cut, counted from the top.
    tp = np.cumsum(np.bincount(group[sad], minlength=len(distinct))[::-1])[::-1][1:]
    fp = np.cumsum(np.bincount(group[~sad], minlength=len(distinct))[::-1])[::-1][1:]
    j_scaled = tp * negatives - fp * positives  # Youden's J times positives * negatives: integers
    tied = np.flatnonzero(j_scaled == j_scaled.max())
    cut = int(tied[len(tied) // 2])
    below, above = distinct[cut], distinct[cut + 1]
    value = separating_value(below, above)
    fn = positives - int(tp[cut])
    return {
        "value": value, "chosen_on": "val", "rule": "max Youden's J among thresholds that split the val scores",
        "youden_j": float(j_scaled[cut]) / (positives * negatives), "f1": 2 * int(tp[cut]) / (2 * int(tp[cut]) + int(fp[cut]) + fn),
        "auc": auc, "gap": [float(below), float(above)],
    }


def separating_value(below: float, above: float) -> float:
    """A float32 t with below < t <= above (both float32, below < above): the midpoint, rounded into the gap."""
    below, above = np.float32(below), np.float32(above)
    t = np.float32((np.float64(below) + np.float64(above)) / 2)
    if t <= below:  # neighbours (or rounding down onto `below`): the next float32 up is in the gap
        t = np.nextafter(below, np.float32(np.inf))
    return float(t)


def _fallback(reason: str, auc: float | None = None) -> dict:
    return {"value": DEFAULT_THRESHOLD, "chosen_on": None, "f1": None, "youden_j": None, "auc": auc, "reason": reason}


def defined_metrics(values: dict, split: str, happy: int, sad: int, predicted_sad: float) -> dict:
    """A split's measured `values` (the per-epoch Keras metrics) with each undefined one set to None and its
    reason under "undefined".

    `happy`, `sad`: the split's real images per class; `predicted_sad`: how many it called sad.
    """
    reasons = {}
    if happy + sad == 0:
        reasons = dict.fromkeys(KERAS_METRICS, f"no {split} split")
    else:
        if happy == 0 or sad == 0:
            reasons["auc"] = "one class only"
        if sad == 0:
            reasons["recall"] = "no sad images"
        if predicted_sad == 0:
            reasons["precision"] = "no sad predictions"
    measured = {name: None if name in reasons else float(values[name]) for name in KERAS_METRICS}
    return measured | {"n": happy + sad, "undefined": reasons}


def shown(metrics: dict, name: str) -> str:
    """A metric for a log line: 0.9512, or n/a with the reason."""
    value = metrics[name]
    return f"{value:.4f}" if value is not None else f"n/a ({metrics['undefined'][name]})"
