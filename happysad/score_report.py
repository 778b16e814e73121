"""A scoring output read back: _summary.json and _report.html beside its Parquet, built in one streaming pass.

The pass reads the output's Parquet files in batches (`path`, `score`, `label`,
`error` only) and keeps what does not grow with rows: counts, errors by reason
with a few example paths, two fixed-bin histograms (100 bins for the page, the
20 drift bins of `metrics.score_histogram`), and a bounded selection per contact
sheet (`Smallest`: the k rows with the smallest key, ties broken by a hash of the
path, so a sheet is drawn from the whole run, never its first rows). Only the
images of the chosen rows are read again (`read_back`): files by the raw bytes of
their name, S3 objects by key, archive members by one scan of each archive for all
its wanted members. Nothing here needs Ray or a model: `score` calls `write` when
it ends (under its lock), `happysad report` calls `rebuild`, `happysad label`
takes its band from `select`.

Everything written follows from the Parquet rows, the output's `_scoring.json`
and the model's model.json: the same rows give the same bytes.
"""

from __future__ import annotations

import json
import os
import posixpath
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from happysad import inputs, lock, metrics, render, run_files, score_output, storage
from happysad.decode import decode_image
from happysad.storage import UsageError

# `_`-named, as score_output.RECORD: Parquet readers (pyarrow.dataset, pandas) skip them when they read the folder
SUMMARY, PAGE = "_summary.json", "_report.html"
SHEET_SIZE = 24  # thumbnails per contact sheet
EXAMPLES = 5  # example paths per error reason
DISPLAY_BINS = 100  # the page's histogram (drift uses metrics.DRIFT_BINS)
BATCH_ROWS = 65_536  # rows per batch of the pass: with one batch read ahead, what the pass holds
READ_BACK_MAX = 256 << 20  # the largest image read back for a thumbnail (it was scored, so it is an image)
THUMB_SIDE = 128  # thumbnails: the model's 256x256 view, halved, as JPEG
COLUMNS = ["path", "score", "label", "error"]


# --- the output's rows ----------------------------------------------------------------------------------------------


def batches(output: str):
    """The output's rows, `COLUMNS` only, in batches of at most BATCH_ROWS, one batch and one file read ahead."""
    dataset = score_output.rows(output)
    if dataset is not None:
        yield from dataset.to_batches(columns=COLUMNS, batch_size=BATCH_ROWS, batch_readahead=1, fragment_readahead=1)


# --- the bounded selection -------------------------------------------------------------------------------------------


@dataclass
class Smallest:
    """The k rows with the smallest keys seen so far, ties broken by the 64-bit hash of the path
    (`inputs.path_hashes`): what it keeps is fixed by the rows, not by their order, and a tie of many rows
    (a saturated score) is a spread over the whole run. Holds k rows, whatever it is offered."""

    k: int
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    ties: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    scores: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    paths: list[str] = field(default_factory=list)

    def offer(self, keys: np.ndarray, paths: pa.Array, scores: np.ndarray) -> None:
        """Rows with these keys (NaN: not a candidate), paths and scores."""
        candidate = np.isfinite(keys)
        if len(self.keys) >= self.k:
            candidate &= keys <= self.keys[-1]
        index = np.flatnonzero(candidate)
        if len(index) > self.k:  # only the batch's k smallest (and any tied with the k-th) can stay
            kth = np.partition(keys[index], self.k - 1)[self.k - 1]
            index = index[keys[index] <= kth]
        if not len(index):
            return
        new_paths = paths.take(pa.array(index)).to_pylist()
        all_keys = np.r_[self.keys, keys[index]]
        all_ties = np.r_[self.ties, inputs.path_hashes(new_paths)]
        kept = np.lexsort((all_ties, all_keys))[: self.k]
        all_paths = self.paths + new_paths
        self.keys, self.ties = all_keys[kept], all_ties[kept]
        self.scores = np.r_[self.scores, scores[index]][kept]
        self.paths = [all_paths[i] for i in kept]

    def rows(self) -> list[dict]:
        return [{"path": p, "score": float(s)} for p, s in zip(self.paths, self.scores)]


# Each contact sheet's key, from a row's score (NaN for an error row), whether it was called sad, and the
# threshold: the sheet shows the SHEET_SIZE smallest (NaN: not on this sheet).
SHEETS: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "sad": lambda s, sad, t: np.where(sad, -s, np.nan),  # most confident sad: highest scores called sad
    "happy": lambda s, sad, t: np.where(sad, np.nan, s),  # most confident happy: lowest scores called happy
    "borderline": lambda s, sad, t: np.abs(s - t),  # nearest the threshold, either side
}


@dataclass
class Pass:
    """What one pass over an output keeps: bounded, whatever the rows."""

    threshold: float
    selections: dict[str, Smallest]
    rows: int = 0
    labels: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    display: np.ndarray = field(default_factory=lambda: np.zeros(DISPLAY_BINS, np.int64))
    drift_bins: np.ndarray = field(default_factory=lambda: np.zeros(metrics.DRIFT_BINS, np.int64))

    def feed(self, batch: pa.RecordBatch, keys: dict[str, Callable]) -> None:
        self.rows += batch.num_rows
        score_column, error = batch.column("score"), batch.column("error")
        scores = score_column.to_numpy(zero_copy_only=False).astype(np.float64)  # null (an error row): NaN
        sad = pc.fill_null(pc.equal(batch.column("label"), "sad"), False).to_numpy(zero_copy_only=False)
        self.labels.update({c["values"]: c["counts"] for c in pc.value_counts(batch.column("label").drop_null()).to_pylist()})
        self.display += metrics.score_histogram(scores, DISPLAY_BINS)
        self.drift_bins += metrics.score_histogram(scores)
        for name, selection in self.selections.items():
            selection.offer(keys[name](scores, sad, self.threshold), batch.column("path"), scores.astype(np.float32))
        if error.null_count == len(error):
            return
        for reason in pc.unique(error.drop_null()).to_pylist():
            mine = batch.column("path").filter(pc.fill_null(pc.equal(error, reason), False))
            self.errors[reason] += len(mine)
            few = mine.take(pc.array_sort_indices(mine)[:EXAMPLES]).to_pylist()
            self.examples[reason] = sorted(set(self.examples.get(reason, [])) | set(few))[:EXAMPLES]


def one_pass(output: str, threshold: float, selections: dict[str, tuple[Callable, int]]) -> Pass:
    """One streaming pass over the output: counts, histograms, and `selections` ({name: (key, k)})."""
    result = Pass(threshold, {name: Smallest(k) for name, (_, k) in selections.items()})
    keys = {name: key for name, (key, _) in selections.items()}
    for batch in batches(output):
        result.feed(batch, keys)
    return result


def select(output: str, threshold: float, key: Callable, k: int) -> list[dict]:
    """The k rows with the smallest `key(scores, called_sad, threshold)` (NaN: left out), ties by path hash,
    in one pass: rows {path, score}, by key."""
    return one_pass(output, threshold, {"chosen": (key, k)}).selections["chosen"].rows()


# --- reading chosen images back --------------------------------------------------------------------------------------


def read_back(paths: list[str], max_bytes: int = READ_BACK_MAX) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(path, bytes, None) or (path, None, why not) for each of `paths` as score writes them, one at a time:
    whoever takes them holds one image, whatever the images' size.

    A path splits at its first `#` into the input and, if any, an archive member's name; the
    input part, unescaped (`urllib.parse.unquote_to_bytes`), is the exact bytes of a local file
    name or an `s3://bucket/key`. A file or object is read directly; the wanted members of one
    archive are found in one scan of it (`inputs.archive_members`) and each read as `score`
    reads it (`inputs.read_files`: the archive's version checked).
    """
    archives: dict[bytes, dict[str, str]] = {}
    for path in dict.fromkeys(paths):
        source_part, has_member, member = path.partition("#")
        source = urllib.parse.unquote_to_bytes(source_part)
        if has_member:
            archives.setdefault(source, {}).setdefault(member, path)
            continue
        try:
            with storage.open_source(source) as stream:
                data = stream.read(max_bytes + 1)
            yield (path, data, None) if len(data) <= max_bytes else (path, None, f"over {max_bytes >> 20} MB")
        except Exception as exc:  # noqa: BLE001 - one image that cannot be read back is a note on the page
            yield path, None, inputs.describe(exc)
    for source, wanted in archives.items():
        yield from _read_members(source, wanted, max_bytes)


def _read_members(source: bytes, wanted: dict[str, str], max_bytes: int) -> Iterator[tuple[str, bytes | None, str | None]]:
    """The wanted members ({escaped member name: path}) of one archive, in one scan of its headers."""
    left = dict(wanted)
    try:
        version = storage.version(source)
        for member in inputs.archive_members(source, max_bytes, by_reference=True):
            path = left.pop(member.name, None)
            if path is None:  # not wanted, or a later copy of a name already found (score kept the first)
                continue
            if member.error:
                yield path, None, member.detail or member.error
            elif member.offset == inputs.WHOLE:  # a compressed tar carries its members' bytes
                yield path, member.data, None
            else:
                one = {"path": [path], "source": [source], "size": [member.size], "offset": [member.offset], "bytes": [b""],
                       "error": [None], "error_detail": [None], "version": [version]}
                read = inputs.read_files(one, max_bytes)
                yield (path, None, read["error_detail"][0] or read["error"][0]) if read["error"][0] else (path, read["bytes"][0], None)
            if not left:
                return
    except Exception as exc:  # noqa: BLE001 - an archive that cannot be read back is a note on each image left
        reason = inputs.describe(exc)
        for path in left.values():
            yield path, None, reason
        return
    for path in left.values():
        yield path, None, "not in the archive any more"


def thumbnail(data: bytes) -> bytes:
    """The image as the model saw it (256x256 RGB), halved, as JPEG bytes."""
    import cv2

    image = decode_image(data)
    small = cv2.resize(image, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return jpeg.tobytes()


def with_thumbnails(sheets: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each sheet's rows with `jpeg` (a thumbnail's bytes) or `unreadable` (why it cannot be shown now).
    Images are read one at a time and only their thumbnails kept."""
    made: dict[str, dict] = {}
    for path, data, why in read_back([row["path"] for rows in sheets.values() for row in rows]):
        if data is not None:
            try:
                made[path] = {"jpeg": thumbnail(data)}
                continue
            except Exception as exc:  # noqa: BLE001 - changed since it was scored: a note, not a failure
                why = inputs.describe(exc)
        made[path] = {"unreadable": why}
    return {name: [row | made[row["path"]] for row in rows] for name, rows in sheets.items()}


# --- the model's reference -------------------------------------------------------------------------------------------


def model_info(model_uri: str | None) -> dict | None:
    """model.json beside a .keras file, or None."""
    if not model_uri:
        return None
    parent = posixpath.dirname(model_uri) if storage.is_s3(model_uri) else os.path.dirname(model_uri)
    try:
        return json.loads(storage.read_bytes(storage.join(parent, "model.json")))
    except (OSError, ValueError):
        return None


def reference(model_uri: str | None) -> tuple[list[int] | None, str | None]:
    """(the validation score histogram drift is measured against, or None and why there is none)."""
    if not model_uri:
        return None, "no model is named: the output has no readable _scoring.json and no --model was given"
    info = model_info(model_uri)
    if info is None:
        return None, f"no model.json beside {model_uri}"
    counts = run_files.val_histogram(info)
    if counts is None:
        return None, (
            "the model was trained before training kept the validation split's score histogram "
            "(its model.json has no val_histogram): train it again to measure drift"
        )
    if len(counts) != metrics.DRIFT_BINS:
        return None, f"the model's validation histogram has {len(counts)} bins, not {metrics.DRIFT_BINS}"
    return counts, None


# --- _summary.json and _report.html ----------------------------------------------------------------------------------


def build(output: str, model_uri: str | None, threshold: float, model_id: str | None = None) -> tuple[dict, bytes]:
    """(_summary.json's dict, _report.html's bytes) of the rows in `output`, in one pass over them."""
    seen = one_pass(output, threshold, {name: (key, SHEET_SIZE) for name, key in SHEETS.items()})
    ref, why = reference(model_uri)
    drift = metrics.drift(ref, seen.drift_bins) if ref is not None else {"psi": None, "ks": None, "reason": why}
    drift["reference_model"] = model_uri
    scored = int(seen.drift_bins.sum())
    summary = {
        "output": inputs.absolute(output),
        "model": {"id": model_id, "uri": model_uri, "threshold": threshold},
        "rows": seen.rows,
        "scored": scored,
        "labels": {name: int(seen.labels.get(name, 0)) for name in ("happy", "sad")},
        "errors": dict(sorted((k, int(v)) for k, v in seen.errors.items())),
        "error_examples": dict(sorted(seen.examples.items())),
        "histogram": {"range": [0.0, 1.0], "bins": DISPLAY_BINS, "counts": seen.display.tolist()},
        "drift": drift,
    }
    sheets = with_thumbnails({name: seen.selections[name].rows() for name in SHEETS})
    page = render.scoring_page(summary, sheets, ref)
    return summary, page


def write(output: str, model_uri: str | None, threshold: float, model_id: str | None = None) -> dict:
    """Write _summary.json and _report.html into `output` (each atomically); returns the summary."""
    summary, page = build(output, model_uri, threshold, model_id)
    storage.write_bytes(storage.join(output, SUMMARY), (json.dumps(summary, indent=2) + "\n").encode())
    storage.write_bytes(storage.join(output, PAGE), page)
    return summary


def rebuild(output: str, model_uri: str | None = None) -> dict:
    """`happysad report`: _summary.json and _report.html again from the output's Parquet alone, under its lock.

    The threshold and model are the output's record (`_scoring.json`, written by the run's first
    `score`); `model_uri` (a .keras file) names another model whose validation histogram is the
    reference. An output without a record takes the threshold from that model's model.json, else 0.5.
    """
    if storage.file_type(output) == pafs.FileType.File:
        raise UsageError(f"--scores {output}: is a file; expected the --output folder of a scoring run")
    if not score_output.parquet_files(output):
        raise UsageError(f"--scores {output}: holds no Parquet files of a scoring run")
    record = score_output.read_record(output) or {}
    model_uri = model_uri or record.get("model_uri")
    threshold = record.get("threshold")
    if not isinstance(threshold, (int, float)):
        threshold = float((model_info(model_uri) or {}).get("threshold", metrics.DEFAULT_THRESHOLD))
    with lock.held(storage.join(output, ".lock"), "--scores", output):
        return write(output, model_uri, float(threshold), record.get("model"))
