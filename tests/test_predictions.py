"""Labelled prediction tables without Ray: the workers' parts of a run's split read back as one table."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from happysad.predictions import scores_and_sad, worker_predictions
from happysad.run_files import WORKER_PREDICTIONS, WORKER_PREDICTIONS_DIRS


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
