"""`happysad label`: the labelling loop. Copy a band of a scoring run's images out for a person to label,
then copy the labelled ones into a training set's class folders, so the next `train` learns from them.

    happysad label --scores OUT --out DIR [--band LO:HI] [--limit N]
        copies (never moves) the images into DIR/unlabelled/ and writes DIR/labels.csv:
        path (as the Parquet names it), score, label (empty: for a person to fill in), file (the copy)
    happysad label --apply DIR/labels.csv --into DATA
        copies each row labelled happy or sad into DATA/happy/ or DATA/sad/; empty labels are left out

Without --band the images are the --limit (48) scores nearest the run's threshold (the page's
borderline sheet, longer); with --band LO:HI they are --limit of the scores in [LO, HI], drawn
over the whole run by a hash of the path. Files, archive members (`ARCHIVE#MEMBER`) and S3
objects are all copied out as plain files (score_report.read_back). Nothing is ever moved,
overwritten or deleted: a copy whose name exists with other bytes is left out and said so.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import urllib.parse

import numpy as np
import pyarrow.fs as pafs

from happysad import metrics, score_output, score_report, storage
from happysad.model import CLASSES
from happysad.storage import UsageError

DEFAULT_LIMIT = 48  # two borderline sheets' worth: what a person labels in a sitting
FOLDER, CSV_NAME = "unlabelled", "labels.csv"
CSV_COLUMNS = ("path", "score", "label", "file")


def parse_band(text: str) -> tuple[float, float]:
    """--band LO:HI as two floats, 0 <= LO <= HI <= 1."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        low = high = float("nan")
    if not 0 <= low <= high <= 1:
        raise UsageError(f"--band {text}: expected LO:HI with 0 <= LO <= HI <= 1, such as 0.4:0.6")
    return low, high


def copy_name(path: str) -> str:
    """A file name for a scored path: a hash of the whole path (two inputs never share a name), then its last
    component (a member's, for an archive member) with anything but letters, digits, `.`, `_` and `-` as `_`."""
    digest = hashlib.blake2b(path.encode(), digest_size=6).hexdigest()
    last = path.split("#", 1)[-1].rsplit("/", 1)[-1]
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", urllib.parse.unquote(last, errors="replace"))[-80:].lstrip(".")
    return f"{digest}-{tail or 'image'}"


def export(scores: str, out: str, band: tuple[float, float] | None = None, limit: int = DEFAULT_LIMIT) -> dict:
    """Copy the chosen images into OUT/unlabelled/ and write OUT/labels.csv; returns what was done."""
    if limit < 1:
        raise UsageError(f"--limit {limit} must be >= 1")
    if storage.file_type(scores) == pafs.FileType.File or not score_output.parquet_files(scores):
        raise UsageError(f"--scores {scores}: holds no Parquet files of a scoring run")
    csv_uri = storage.join(out, CSV_NAME)
    if storage.file_type(out) == pafs.FileType.File:
        raise UsageError(f"--out {out}: is a file; expected a folder")
    if storage.file_type(csv_uri) != pafs.FileType.NotFound:
        raise UsageError(f"--out {out}: already holds {CSV_NAME} (a labelling round): apply it, or choose another --out")
    record = score_output.read_record(scores) or {}
    threshold = float(record.get("threshold", metrics.DEFAULT_THRESHOLD))
    if band is None:
        rows = score_report.select(scores, threshold, score_report.SHEETS["borderline"], limit)
    else:
        low, high = band
        rows = score_report.select(scores, threshold, lambda s, sad, t: np.where((s >= low) & (s <= high), 0.0, np.nan), limit)
    scores = {row["path"]: row["score"] for row in rows}
    written, missing = [], {}
    for path, data, why in score_report.read_back(list(scores)):  # one image at a time
        if data is None:
            missing[path] = why
            continue
        name = copy_name(path)
        storage.write_bytes(storage.join(out, FOLDER, name), data)
        written.append({"path": path, "score": f"{scores[path]:.6f}", "label": "", "file": f"{FOLDER}/{name}"})
    written.sort(key=lambda r: (float(r["score"]), r["path"]))
    text = io.StringIO()
    writer = csv.DictWriter(text, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(written)
    storage.write_bytes(csv_uri, text.getvalue().encode())  # last: a CSV names only copies that exist
    return {"copied": len(written), "not_readable": missing, "csv": csv_uri, "threshold": threshold, "band": band}


def apply(csv_uri: str, into: str) -> dict:
    """Copy each row labelled happy or sad into INTO/happy/ or INTO/sad/; returns counts.

    Every row is checked before anything is copied: a label other than happy, sad or empty,
    or a copy that is gone, exits 2 naming the line. A row's image is its `file` (relative
    to the CSV's folder), else its `path` read back as `score` named it.
    """
    try:
        text = storage.read_bytes(csv_uri).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--apply {csv_uri}: cannot be read: {exc}") from None
    if storage.file_type(into) == pafs.FileType.File:
        raise UsageError(f"--into {into}: is a file; expected a training data folder (with happy/ and sad/)")
    reader = csv.DictReader(io.StringIO(text))
    columns = set(reader.fieldnames or ())
    if "label" not in columns or not columns & {"file", "path"}:
        raise UsageError(f"--apply {csv_uri}: expected columns label and file or path (as `label --out` writes them)")
    folder = csv_uri.rsplit("/", 1)[0] if storage.is_s3(csv_uri) else str(storage.local_path(csv_uri).parent)
    chosen, unlabelled = [], 0
    for line, row in enumerate(reader, start=2):
        label = (row.get("label") or "").strip().lower()
        if not label:
            unlabelled += 1
            continue
        if label not in CLASSES:
            raise UsageError(f"--apply {csv_uri}: line {line}: label {row['label']!r} is not {' or '.join(CLASSES)} (or empty)")
        file, path = (row.get("file") or "").strip(), (row.get("path") or "").strip()
        if file:
            source = storage.join(folder, file)
            if storage.file_type(source) != pafs.FileType.File:
                raise UsageError(f"--apply {csv_uri}: line {line}: {file}: no such file")
            chosen.append((label, source, None, file.rsplit("/", 1)[-1]))
        elif path:
            chosen.append((label, None, path, copy_name(path)))
        else:
            raise UsageError(f"--apply {csv_uri}: line {line}: neither file nor path names the image")
    counts = {label: 0 for label in CLASSES} | {"unlabelled": unlabelled, "already_there": 0, "not_copied": {}}
    by_path = {path: (label, name) for label, source, path, name in chosen if source is None}

    def images():  # (label, name, bytes), one image at a time
        for label, source, _, name in chosen:
            if source is not None:
                yield label, name, storage.read_bytes(source)
        for path, data, why in score_report.read_back(list(by_path)):
            if data is None:
                counts["not_copied"][path] = why
            else:
                yield (*by_path[path], data)

    for label, name, data in images():
        target = storage.join(into, label, name)
        if storage.file_type(target) == pafs.FileType.File:
            if storage.read_bytes(target) == data:
                counts["already_there"] += 1
            else:
                counts["not_copied"][target] = "a different file of that name is there: not overwritten"
            continue
        storage.write_bytes(target, data)
        counts[label] += 1
    return counts
