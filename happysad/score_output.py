"""A scoring output folder (local or s3://): which of its files are rows, and how a run stages, resumes and records.

    OUTPUT/*.parquet         the rows (SCHEMA), one per input; nothing hidden or `_`-named is rows
    OUTPUT/.staging-<id>/    a run's files while it writes (Parquet readers skip hidden folders)
    OUTPUT/_scoring.json     RECORD: the model and threshold the rows were scored with
    OUTPUT/.lock             held by the one run at a time (`lock`)

A rerun first adopts the complete files a killed attempt left in staging (a half-written
one has no Parquet footer and is dropped), retires the `read_failed` rows of the inputs it
lists, so they are tried again, and then scores only the inputs no row names yet
(`done_hashes`). Anything else a user keeps in the folder (a NOTES.txt) is left alone.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from happysad import inputs, storage
from happysad.storage import UsageError

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("score", pa.float32()),
        ("label", pa.string()),
        ("error", pa.string()),
        ("model", pa.string()),
        ("error_detail", pa.string()),
    ]
)
RECORD = "_scoring.json"  # `_`-named: Parquet readers (pyarrow.dataset, pandas) skip it when they read the folder
STAGING = ".staging-"


def check_output(output: str) -> None:
    if storage.file_type(output) == pafs.FileType.File:
        raise UsageError(f"--output {output}: is a file; expected a folder or s3:// prefix for the Parquet files")


def parquet_files(output: str) -> list[str]:
    """The output's row files, sorted: `*.parquet` in the folder itself, none hidden (staging) or `_`-named."""
    fs, root = storage.filesystem(output)
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(e.path for e in entries if e.is_file and e.base_name.endswith(".parquet") and e.base_name[0] not in "._")


def rows(output: str) -> pads.Dataset | None:
    """The output's rows as one dataset, or None when it holds no row file yet."""
    files = parquet_files(output)
    fs, _ = storage.filesystem(output)
    return pads.dataset(files, format="parquet", filesystem=fs, schema=SCHEMA) if files else None


def new_staging(output: str) -> str:
    """A staging folder of its own for this attempt."""
    return storage.join(output, f"{STAGING}{uuid.uuid4().hex[:12]}")


def finish_staged(output: str) -> int:
    """Move complete Parquet files out of every staging folder, drop half-written ones; rows moved."""
    fs, root = storage.filesystem(output)
    moved = 0
    for entry in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith(STAGING):
            continue
        for f in fs.get_file_info(pafs.FileSelector(entry.path, recursive=True)):
            complete = _complete_parquet_rows(fs, f.path) if f.is_file and f.base_name.endswith(".parquet") else None
            if complete is not None:
                fs.move(f.path, f"{root}/{f.base_name}")
                moved += complete
        fs.delete_dir(entry.path)
    return moved


def _complete_parquet_rows(fs, path: str) -> int | None:
    try:
        with fs.open_input_file(path) as f:
            return pq.read_metadata(f).num_rows
    except (OSError, pa.ArrowInvalid):
        return None


def retire_read_failed(output: str, found: inputs.Inputs) -> int:
    """Rewrite each output file without the `read_failed` rows of this run's inputs, so they are tried again.
    Rows of inputs this run does not list stay as they are."""
    dataset = rows(output)
    fs, _ = storage.filesystem(output)
    listed = None  # hashes of this run's inputs, made only if some row failed to read
    retired = 0
    for fragment in dataset.get_fragments() if dataset else []:
        table = fragment.to_table(schema=SCHEMA)
        failed = np.flatnonzero(pc.fill_null(pc.equal(table["error"], "read_failed"), False).to_numpy(zero_copy_only=False))
        if not len(failed):
            continue
        if listed is None:
            listed = np.unique(inputs.path_hashes(found.files["path"].to_pylist() + [a.uri for a in found.archives]))
        # A member's path is ARCHIVE#MEMBER, and a file's own `#` is escaped: the first `#` ends its input's path.
        owners = [path.split("#", 1)[0] for path in table["path"].take(failed).to_pylist()]
        retire = np.zeros(table.num_rows, bool)
        retire[failed[inputs.done_mask(listed, inputs.path_hashes(owners))]] = True
        if not retire.any():
            continue
        kept = table.filter(pa.array(~retire))
        if kept.num_rows:
            storage.write_parquet(storage.to_uri(fragment.path, output), kept)
        else:
            fs.delete_file(fragment.path)
        retired += int(retire.sum())
    return retired


def done_hashes(output: str) -> np.ndarray:
    """Sorted 64-bit hashes of every path with a row: 8 bytes a row, however long the paths."""
    dataset = rows(output)
    chunks = [inputs.path_hashes(b.column(0).to_pylist()) for b in dataset.to_batches(columns=["path"])] if dataset else []
    return np.unique(np.concatenate(chunks)) if chunks else np.empty(0, np.uint64)


def check_record(output: str, model) -> None:
    """Refuse to add rows of another model or threshold to an output; record them on its first run.
    `model`: a `score.Model` (its id, uri and threshold)."""
    uri = storage.join(output, RECORD)
    mine = {"model": model.id, "threshold": model.threshold}
    dataset = rows(output)
    if dataset is None:  # no rows yet (a first run, or one that stopped before its first file): this run's record
        theirs = None
    elif storage.file_type(uri) == pafs.FileType.File:
        theirs = read_record(output)
        if theirs is None:  # the rows' threshold is not known: adding to them could mix two
            raise UsageError(f"--output {output}: {RECORD} is damaged (not a JSON record of the rows' model and threshold): "
                             "restore it or choose another --output")
    else:  # an output written before the record existed: its rows name their model
        ids = pc.unique(dataset.to_table(columns=["model"]).column(0)).to_pylist()
        theirs = {"model": ids[0], "threshold": "unknown"} if ids and ids != [model.id] else None
    if theirs is None:
        storage.write_bytes(uri, json.dumps(mine | {"model_uri": model.uri}, indent=2).encode())
    elif (theirs.get("model"), theirs.get("threshold")) != (model.id, model.threshold):
        raise UsageError(
            f"--output {output}: holds rows of model {theirs.get('model')} at threshold {theirs.get('threshold')}; this run's "
            f"model {model.id} at threshold {model.threshold} would mix them in one output: choose another --output"
        )


def read_record(output: str) -> dict | None:
    """The output's record, or None where it is missing or damaged."""
    try:
        record = json.loads(storage.read_bytes(storage.join(output, RECORD)))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class StagedWriter:
    """Parquet files of at most `rows` rows each in a staging folder (`finish_staged` moves the complete ones):
    how a job scored in-process writes, as Ray Data's writer does on Ray."""

    def __init__(self, staging: str, rows_per_file: int):
        self.fs, self.root = storage.filesystem(staging)
        self.fs.create_dir(self.root)
        self.rows, self.writer, self.count, self.files = rows_per_file, None, 0, 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self.writer is None or self.count >= self.rows:
                self.close()
                self.writer = pq.ParquetWriter(self.fs.open_output_stream(f"{self.root}/{uuid.uuid4().hex}_{self.files:06d}.parquet"), SCHEMA)
                self.files, self.count = self.files + 1, 0
            part = table.slice(0, self.rows - self.count)
            self.writer.write_table(part)
            self.count += part.num_rows
            table = table.slice(part.num_rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
