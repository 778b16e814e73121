"""Batch scoring on Ray Data: inputs -> read -> decode + model replicas -> Parquet, one row per input.

Atomic, resumable output: Ray writes Parquet into a hidden staging folder of
this attempt (`OUTPUT/.staging-<id>/`, which Parquet readers skip), and each
finished file is moved into OUTPUT when the run ends. A rerun with the same
arguments first adopts the complete files a killed attempt left in staging
(a half-written one has no Parquet footer and is removed), then scores only
the inputs that no output row names yet.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from happysad import inputs, storage
from happysad.decode import DecodeError, decode_image
from happysad.storage import UsageError

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [("path", pa.string()), ("score", pa.float32()), ("label", pa.string()), ("error", pa.string()), ("model", pa.string())]
)
FILES_PER_BLOCK = 640  # most paths per block: whole model batches, few small files (FIELD_NOTES)


@dataclass(frozen=True)
class ScoreConfig:
    inputs: tuple[str, ...] = ()  # files, folders, s3:// prefixes, .tar/.tar.gz/.zip archives
    output: str = ""  # folder (local or s3://) of Parquet files
    model: str = ""  # a .keras file or a run directory; empty = the latest run under runs/
    batch_size: int = 64  # images per model call
    concurrency: int = 0  # model replicas; 0 = fit the cluster, leaving a CPU for reading
    gpu: bool = False  # one GPU per replica
    threshold: float = 0.5  # score at or above it is "sad"
    rows_per_file: int = 10_000  # Parquet rows per output file: also how much a kill can lose

    def __post_init__(self):
        if not self.inputs:
            raise UsageError("--input is required (a file, folder, s3:// prefix or archive)")
        if not self.output:
            raise UsageError("--output is required (a folder or s3:// prefix)")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} must be >= 1")
        if self.concurrency < 0:
            raise UsageError(f"--concurrency {self.concurrency} must be >= 0")
        if self.rows_per_file < 1:
            raise UsageError(f"--rows-per-file {self.rows_per_file} must be >= 1")
        if not 0 <= self.threshold <= 1:
            raise UsageError(f"--threshold {self.threshold} must be within [0, 1]")



def resolve_model(uri: str) -> str:
    """The .keras file a --model value names: a file, a run directory, or the latest local run."""
    if not uri:
        runs = sorted(p for p in (os.listdir("runs") if os.path.isdir("runs") else []) if not p.startswith("."))
        candidates = [os.path.join("runs", r, "model.keras") for r in reversed(runs)]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            raise UsageError("--model not given and no runs/*/model.keras here: train first or pass --model")
        return os.path.abspath(found)
    kind = storage.file_type(uri)
    if kind == pafs.FileType.Directory:
        uri = storage.join(uri, "model.keras")
        kind = storage.file_type(uri)
    if kind != pafs.FileType.File:
        raise UsageError(f"--model {uri}: no such model file")
    return uri if storage.is_s3(uri) else storage.filesystem(uri)[1]


def load_scoring_model(uri: str):
    """(keras model, model id) from a local or s3:// .keras file; safe_mode, no optimizer."""
    from happysad.model import file_digest, load_model

    data = storage.read_bytes(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as f:
            f.write(data)
        return load_model(path), file_digest(data)


class Scorer:
    """Decodes and scores batches of {path, bytes, error}; loads the model once per replica."""

    def __init__(self, model_uri: str, threshold: float):
        import tensorflow as tf

        model, self.model_id = load_scoring_model(model_uri)
        self.threshold = threshold
        self.predict = tf.function(lambda x: model(x, training=False))

    def __call__(self, batch: dict) -> pa.Table:
        n = len(batch["path"])
        # An all-null error column can arrive as float NaN: only strings are errors.
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        images, good = [], []
        for i, data in enumerate(batch["bytes"]):
            if errors[i]:
                continue
            try:
                images.append(decode_image(data))
                good.append(i)
            except DecodeError as exc:
                errors[i] = exc.reason
        scores = np.full(n, np.nan, np.float32)
        if images:
            scores[good] = self.predict(np.stack(images)).numpy()[:, 0]
        ok = np.zeros(n, bool)
        ok[good] = True
        labels = np.where(scores >= self.threshold, "sad", "happy")
        return pa.table(
            {
                "path": list(batch["path"]),
                "score": pa.array(scores, pa.float32(), mask=~ok),
                "label": pa.array([labels[i] if ok[i] else None for i in range(n)], pa.string()),
                "error": pa.array(errors, pa.string()),
                "model": [self.model_id] * n,
            },
            schema=SCHEMA,
        )


def _finish_staged(output: str) -> None:
    """Move complete Parquet files out of every staging folder; drop half-written ones."""
    fs, root = storage.filesystem(output)
    for entry in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith(".staging-"):
            continue
        for f in fs.get_file_info(pafs.FileSelector(entry.path, recursive=True)):
            if f.is_file and f.base_name.endswith(".parquet") and _is_complete_parquet(fs, f.path):
                fs.move(f.path, f"{root}/{f.base_name}")
        fs.delete_dir(entry.path)


def _is_complete_parquet(fs, path: str) -> bool:
    try:
        with fs.open_input_file(path) as f:
            pq.read_metadata(f)
        return True
    except (OSError, pa.ArrowInvalid):
        return False


def _output_files(output: str) -> pads.Dataset | None:
    fs, root = storage.filesystem(output)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return None
    dataset = pads.dataset(root, format="parquet", filesystem=fs, schema=SCHEMA)  # skips hidden staging
    return dataset if dataset.files else None


def _done_paths(output: str) -> frozenset:
    dataset = _output_files(output)
    if dataset is None:
        return frozenset()
    return frozenset(p for batch in dataset.to_batches(columns=["path"]) for p in batch.column(0).to_pylist())


def _summary(output: str) -> tuple[int, Counter]:
    rows, errors = 0, Counter()
    dataset = _output_files(output)
    for batch in dataset.to_batches(columns=["error"]) if dataset else []:
        rows += batch.num_rows
        errors.update(e for e in batch.column(0).to_pylist() if e)
    return rows, errors


def _replicas(config: ScoreConfig) -> int:
    if config.concurrency:
        return config.concurrency
    resources = ray.cluster_resources()
    if config.gpu:
        return max(1, int(resources.get("GPU", 1)))
    return max(1, int(resources.get("CPU", 2)) - 1)  # a pool on every CPU starves the readers and hangs


def build_pipeline(config: ScoreConfig, model_uri: str, files: list[str], archives: list[str], done: frozenset):
    parts = []
    todo = [f for f in files if f not in done]
    if todo:
        # Each input block becomes one output file: the block size is also what a kill can lose.
        blocks = -(-len(todo) // min(FILES_PER_BLOCK, config.rows_per_file))
        paths = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=blocks)
        parts.append(paths.map_batches(inputs.read_files, batch_size=config.batch_size))
    if archives:
        listed = ray.data.from_items([{"path": a} for a in archives], override_num_blocks=len(archives))
        parts.append(listed.flat_map(inputs.read_archive, fn_kwargs={"done": done}))
    if not parts:
        return None
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs={"model_uri": model_uri, "threshold": config.threshold},
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=_replicas(config)),
        num_gpus=1 if config.gpu else 0,
        num_cpus=0 if config.gpu else 1,
    )


def run(config: ScoreConfig) -> dict:
    """Score every input not yet in --output; print and return a summary."""
    model_uri = resolve_model(config.model)
    files, archives = inputs.expand(list(config.inputs))
    started = time.perf_counter()
    _finish_staged(config.output)
    done = _done_paths(config.output)
    rows_before = len(done)
    pipeline = build_pipeline(config, model_uri, files, archives, done)
    if pipeline is not None:
        staging = storage.join(config.output, f".staging-{uuid.uuid4().hex[:12]}")
        fs, staging_path = storage.filesystem(staging)
        pipeline.write_parquet(staging_path, filesystem=fs, min_rows_per_file=config.rows_per_file)
        _finish_staged(config.output)
    seconds = time.perf_counter() - started
    rows, errors = _summary(config.output)
    summary = {
        "rows": rows,
        "new_rows": rows - rows_before,
        "errors": dict(errors),
        "images_per_second": (rows - rows_before) / seconds,
        "output": config.output,
    }
    print(
        f"scored {summary['new_rows']} inputs ({rows} rows in all) at {summary['images_per_second']:.1f} img/s; "
        f"errors: {dict(errors) or 'none'}; output: {config.output}",
        flush=True,
    )
    return summary
