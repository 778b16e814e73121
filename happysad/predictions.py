"""Tables of labelled predictions: score's columns plus `true_label`, one row per image.

What `evaluate` writes as predictions.parquet and a training run as val_ and
test_predictions.parquet; the workers' parts of a run's splits and their merge;
which rows count toward the metrics; evaluation.json's figures; the worst rows
a report shows. The numbers come from `happysad.metrics`, on the exact scores.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from happysad import run_files, score, score_output, storage
from happysad.metrics import binary_metrics, log_losses
from happysad.model import CLASSES

LABELLED_ROWS = score_output.SCHEMA.append(pa.field("true_label", pa.string()))  # predictions and a run's split predictions
WORST = 16  # rows a report shows with their heat maps


def labelled_rows(table: pa.Table) -> pa.Table:
    """Rows that count toward the metrics: scored (no error) and labelled happy or sad."""
    keep = pc.and_(pc.is_valid(table["score"]), pc.is_in(table["true_label"], pa.array(CLASSES)))
    return table.filter(pc.fill_null(keep, False))


def skipped_reasons(table: pa.Table, listing_skipped: dict) -> dict:
    """Inputs that count toward no metric, by reason: listing skips, read/decode errors, no label."""
    skipped = Counter(listing_skipped)
    skipped.update(e for e in table["error"].to_pylist() if e)
    labelled = pc.fill_null(pc.is_in(table["true_label"], pa.array(CLASSES)), False)
    unlabelled = pc.and_(pc.is_null(table["error"]), pc.invert(labelled))
    skipped["no_label"] += pc.sum(pc.cast(unlabelled, pa.int64())).as_py() or 0
    return {k: v for k, v in sorted(skipped.items()) if v}


def evaluation(table: pa.Table, threshold: float, listing_skipped: dict) -> dict:
    """evaluation.json's content from the predictions table."""
    rows = labelled_rows(table)
    sad = np.array(rows["true_label"].to_pylist()) == "sad"
    result = binary_metrics(rows["score"].to_numpy(), sad, threshold)
    counts = {c: int(np.sum(sad == (c == "sad"))) for c in CLASSES}
    return result | {"counts": counts, "skipped": skipped_reasons(table, listing_skipped)}


def worst_rows(table: pa.Table, k: int = WORST) -> list[dict]:
    """The k worst errors (highest loss first); with fewer than k errors, the highest-loss correct rows follow.

    Errors come first even when a correct call near the threshold has the higher loss: the
    page is for seeing what the model gets wrong. Each row says whether it is an error.
    """
    rows = labelled_rows(table)
    if not rows.num_rows:
        return []
    scores = rows["score"].to_numpy().astype(np.float64)
    sad = np.array(rows["true_label"].to_pylist()) == "sad"
    losses = log_losses(scores, sad)
    wrong = np.array(rows["label"].to_pylist()) != np.array(rows["true_label"].to_pylist())
    top = np.lexsort((-losses, ~wrong))[:k]  # errors first, then by loss, highest first
    picked = rows.take(pa.array(top)).to_pylist()
    return [r | {"loss": float(losses[i]), "wrong": r["label"] != r["true_label"]} for r, i in zip(picked, top)]


def worker_predictions(output: str, split: str) -> pa.Table:
    """Every worker's rows of `split` (WORKER_PREDICTIONS: path, score, true_label), sorted by path; none: 0 rows."""
    import pyarrow.parquet as pq

    fs, parts = storage.filesystem(storage.join(output, run_files.WORKER_PREDICTIONS_DIRS[split]))
    try:
        rows = pq.read_table(parts, filesystem=fs, schema=run_files.WORKER_PREDICTIONS)
    except FileNotFoundError:  # an empty split: no worker wrote any
        return run_files.WORKER_PREDICTIONS.empty_table()
    return rows.sort_by("path")


def scores_and_sad(rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scores, bool sad) of prediction rows."""
    scores = rows["score"].to_numpy().astype(np.float32, copy=False)
    return scores, np.array(rows["true_label"].to_pylist()) == "sad"


def write_predictions(output: str, predictions: dict[str, pa.Table], model: score.Model) -> dict[str, pa.Table]:
    """Each split's worker rows (run_files.WORKER_PREDICTIONS) as `predict` gives them, labelled at the model's
    threshold, sorted by path: written to run_files.PREDICTIONS[split] in the run directory, then the workers'
    own files are removed. Returns the written tables."""
    written = {}
    for split, rows in predictions.items():
        n = rows.num_rows
        given = {
            "path": rows["path"], "score": rows["score"], "label": score.decided_labels(rows["score"].to_numpy(), model.threshold),
            "model": [model.id] * n, "true_label": rows["true_label"],
        }
        # Every row was scored: the error columns (and any other) are null.
        columns = {field.name: given.get(field.name, pa.nulls(n, field.type)) for field in LABELLED_ROWS}
        table = pa.table(columns, schema=LABELLED_ROWS).sort_by("path")
        storage.write_parquet(storage.join(output, run_files.PREDICTIONS[split]), table)
        written[split] = table
    for split in predictions:  # last: until the merged files are written, the workers' files are the only copy
        fs, parts = storage.filesystem(storage.join(output, run_files.WORKER_PREDICTIONS_DIRS[split]))
        if fs.get_file_info(parts).type == pafs.FileType.Directory:
            fs.delete_dir(parts)
    return written
