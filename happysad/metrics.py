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


# --- drift: a scoring run's scores against the validation split's -------------------------------------------------

DRIFT_BINS = 20  # fixed bins on [0, 1]: model.json's validation histogram and every scoring run's
PSI_MODERATE, PSI_SHIFTED = 0.1, 0.25  # the credit-scoring rule of thumb (Siddiqi 2006; docs/scoring.md)
PSI_PSEUDO_COUNT = 0.5  # added to each bin of both histograms, so an empty bin has a finite log ratio
KS_CRITICAL_05 = 1.358  # c(0.05) of the two-sample Kolmogorov-Smirnov test: D > c * sqrt((n + m) / (n m))


def score_histogram(scores, bins: int = DRIFT_BINS) -> np.ndarray:
    """Counts of `scores` in `bins` equal bins on [0, 1] (int64); a score of 1 is in the last bin, NaN in none.

    Bin i holds floor(score * bins) == i, computed in float64 from the float32 score:
    every histogram that drift compares is made by this one function.
    """
    s = np.asarray(scores, np.float64).ravel()
    s = s[np.isfinite(s)]
    index = np.clip(np.floor(s * bins), 0, bins - 1).astype(np.int64)
    return np.bincount(index, minlength=bins).astype(np.int64)


def psi(reference, counts) -> float:
    """Population stability index of `counts` against `reference` (two histograms on the same bins):
    sum over bins of (p - q) * ln(p / q), p this run's share and q the reference's, each bin's count
    plus PSI_PSEUDO_COUNT. 0 for the same shares; symmetric in the two."""
    q = _shares(reference)
    p = _shares(counts)
    return float(max(0.0, np.sum((p - q) * np.log(p / q))))


def _shares(counts) -> np.ndarray:
    c = np.asarray(counts, np.float64) + PSI_PSEUDO_COUNT
    return c / c.sum()


def psi_by_chance(reference, counts) -> float:
    """The PSI two samples of one distribution give on average, of the sizes and bins in use:
    (k - 1) (1/n + 1/m), k the bins either sample fills (PSI is about a chi-square over n m / (n + m))."""
    reference, counts = np.asarray(reference), np.asarray(counts)
    n, m = reference.sum(), counts.sum()
    k = int(np.sum((reference + counts) > 0))
    return float(max(k - 1, 0) * (1 / n + 1 / m)) if n and m else float("nan")


def ks_binned(reference, counts) -> tuple[float, int]:
    """The two-sample Kolmogorov-Smirnov statistic from two histograms on the same bins, and the bin edge
    (index into the bins' upper edges) where it is reached: the largest gap between the two cumulative
    shares at a bin edge. The exact statistic of the scores is at least this (binning can only hide a gap)."""
    a = np.cumsum(np.asarray(reference, np.float64))
    b = np.cumsum(np.asarray(counts, np.float64))
    gaps = np.abs(a / a[-1] - b / b[-1])
    at = int(np.argmax(gaps))
    return float(gaps[at]), at


def ks_p_value(d: float, n: int, m: int) -> float:
    """Asymptotic p-value of a two-sample KS statistic D for sample sizes n and m (Kolmogorov's
    distribution with Stephens' small-sample correction, as in Numerical Recipes' probks)."""
    ne = n * m / (n + m)
    lam = (np.sqrt(ne) + 0.12 + 0.11 / np.sqrt(ne)) * d
    if lam < 0.2:  # the series does not converge well here, and the answer is 1 to many places
        return 1.0
    j = np.arange(1, 101)
    return float(np.clip(2 * np.sum((-1.0) ** (j - 1) * np.exp(-2 * j**2 * lam**2)), 0.0, 1.0))


def drift(reference, counts) -> dict:
    """This run's score histogram `counts` against the validation histogram `reference` (same bins):
    PSI with its level and the PSI two samples of one distribution would give by chance, the binned KS
    statistic with its p-value and 5 % critical value, and a reading of each in plain words.
    Undefined (None, with the reason) when either histogram is empty."""
    reference, counts = np.asarray(reference, np.int64), np.asarray(counts, np.int64)
    n_ref, n = int(reference.sum()), int(counts.sum())
    base = {"bins": len(reference), "range": [0.0, 1.0], "reference_n": n_ref, "n": n}
    if len(reference) != len(counts):
        raise ValueError(f"histograms of {len(reference)} and {len(counts)} bins cannot be compared")
    if not n_ref or not n:
        reason = "the validation split had no scores" if not n_ref else "this run has no scored image"
        return base | {"psi": None, "ks": None, "reason": reason}
    value = psi(reference, counts)
    chance = psi_by_chance(reference, counts)
    level = "stable" if value < PSI_MODERATE else "moderate" if value < PSI_SHIFTED else "shifted"
    d, at = ks_binned(reference, counts)
    p_value = ks_p_value(d, n_ref, n)
    critical = KS_CRITICAL_05 * np.sqrt((n_ref + n) / (n_ref * n))
    edge = (at + 1) / len(reference)
    below_ref = float(np.cumsum(reference)[at] / n_ref)
    below_run = float(np.cumsum(counts)[at] / n)
    return base | {
        "psi": value, "psi_level": level, "psi_by_chance": chance,
        "psi_rule": f"PSI < {PSI_MODERATE}: stable; {PSI_MODERATE} to {PSI_SHIFTED}: moderate shift; >= {PSI_SHIFTED}: shifted (Siddiqi 2006)",
        "ks": d, "ks_p_value": p_value, "ks_critical_05": float(critical), "ks_at": edge,
        "reading": {
            "psi": _psi_reading(value, level, chance, n_ref),
            "ks": _ks_reading(d, p_value, edge, below_ref, below_run),
        },
    }


def _psi_reading(value: float, level: str, chance: float, n_ref: int) -> str:
    words = {
        "stable": "no meaningful shift: this run's scores are distributed as the validation split's were",
        "moderate": "a moderate shift: the scores are distributed somewhat differently from validation; worth a look",
        "shifted": "shifted: the scores are distributed differently from validation, so the error rates measured "
        "there may not hold for these images",
    }[level]
    text = f"PSI {value:.3f}: {words}."
    if level != "stable" and value < 2 * chance:
        text += (
            f" But with {n_ref} validation images, two samples of one distribution give a PSI near {chance:.3f} "
            "by chance alone: read it as a hint, not a finding."
        )
    return text


def _ks_reading(d: float, p_value: float, edge: float, below_ref: float, below_run: float) -> str:
    chance = "unlikely to be chance (p < 0.05)" if p_value < 0.05 else "within what chance gives (p >= 0.05)"
    return (
        f"KS {d:.3f}: the largest gap between the two cumulative distributions is at score {edge:.2f}, "
        f"where {below_run:.0%} of this run's images score below it against {below_ref:.0%} of validation's; "
        f"p = {p_value:.2g}, {chance}."
    )
