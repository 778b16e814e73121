"""Batch scoring on Ray Data: inputs -> read -> decode -> model replicas -> Parquet, one row per input.

Placement. On CPUs, one replica class reads, decodes and predicts each batch
(two calls at a time, each in its own thread): on a small box that beats a
separate decode stage, whose decoded images (196 KB each) would cross the
object store (FIELD_NOTES). With --gpu, reading and decoding are CPU tasks
spread over every CPU of the cluster, and the GPU replicas only predict: one
GPU runs the model far faster than one core decodes.

A small job with no cluster named (`runs_in_process`) is scored in this process
with the same replica and two threads, and written the same way: starting Ray and
a replica process would cost more than the job (bench/score_bench.py).

Atomic, resumable output: each attempt writes into a hidden staging folder of its
own, whose complete files are moved into OUTPUT when it ends; a rerun adopts what a
killed attempt staged and scores only the inputs no row names yet (`score_output`).
One run at a time holds OUTPUT/.lock.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import logging
import os
import posixpath
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from happysad import console, gpus, inputs, lock, metrics, score_output, score_report, storage
from happysad.decode import DecodeError, decode_image
from happysad.model import CLASSES, IMAGE_SIZE, check_model_file, file_digest
from happysad.storage import UsageError

log = logging.getLogger(__name__)

IN_FLIGHT_PER_CPU = 32 << 20  # object-store bytes in flight per cluster CPU while a compressed tar streams...
IN_FLIGHT_FLOOR = 300 << 20  # ...and at least this (bench/archive_memory.py, 2 CPUs, 1 GB tar.gz: 23 s -> 35 s, reader 837 -> 352 MB)
READERS_MIN = 4  # archive readers at once, at least; else two per CPU the cluster has at start
BATCHES_PER_BLOCK = 4  # model batches per block of paths: blocks are the unit replicas and decode tasks take
CALLS_PER_REPLICA = 2  # batches a CPU replica reads, decodes and predicts at once, each in its own thread


@dataclass(frozen=True)
class ScoreConfig:
    inputs: tuple[str, ...] = ()  # files, folders, s3:// prefixes, .tar/.tar.gz/.zip archives
    output: str = ""  # folder (local or s3://) of Parquet files
    model: str = ""  # a .keras file or a run directory; empty = the newest run under runs/
    batch_size: int = 64  # images per model call
    concurrency: int = 0  # model replicas; 0 = a pool from one up to as many as the cluster grows to
    gpu: bool = False  # one GPU per replica
    threshold: float | None = None  # score at or above it is "sad"; None = the model's (model.json), else 0.5
    rows_per_file: int = 10_000  # most Parquet rows per output file: also the most a kill can lose
    max_file_mb: int = 64  # a file or member larger than this is `too_large`, never read

    def __post_init__(self):
        if not self.inputs:
            raise UsageError("--input is required (a file, folder, s3:// prefix or archive)")
        if not self.output:
            raise UsageError("--output is required (a folder or s3:// prefix)")
        for flag, value in (("--batch-size", self.batch_size), ("--rows-per-file", self.rows_per_file), ("--max-file-mb", self.max_file_mb)):
            if value < 1:
                raise UsageError(f"{flag} {value} must be >= 1")
        if self.concurrency < 0:
            raise UsageError(f"--concurrency {self.concurrency} must be >= 0")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise UsageError(f"--threshold {self.threshold} must be within [0, 1]")

    @property
    def max_bytes(self) -> int:
        return self.max_file_mb << 20


@dataclass(frozen=True)
class Model:
    uri: str  # the .keras file
    id: str  # first 16 hex digits of its sha256
    threshold: float  # from model.json beside it, else 0.5


def resolve_model(uri: str) -> str:
    """The .keras file a --model value names: a file, a run directory, or the newest local run."""
    if not uri:
        runs = glob.glob(os.path.join("runs", "*", "model.keras"))
        if not runs:
            raise UsageError("--model not given and no runs/*/model.keras here: train first or pass --model")
        newest = os.path.abspath(max(runs, key=os.path.getmtime))  # by modification time
        print(f"--model not given: the newest run's, {newest}", file=sys.stderr, flush=True)
        return newest
    kind = storage.file_type(uri)
    if kind == pafs.FileType.Directory:
        uri = storage.join(uri, "model.keras")
        kind = storage.file_type(uri)
    if kind != pafs.FileType.File:
        raise UsageError(f"--model {uri}: no such model file")
    return uri if storage.is_s3(uri) else storage.filesystem(uri)[1]


def open_model(flag_value: str, threshold: float | None = None) -> Model:
    """Find, check and identify the model in the driver, without Keras: a bad --model fails here, at once."""
    uri = resolve_model(flag_value)
    data = storage.read_bytes(uri)
    check_model_file(data, flag_value or uri)
    if threshold is None:
        threshold = stored_threshold(uri)
    return Model(uri, file_digest(data), threshold)


def stored_threshold(model_uri: str) -> float:
    """The decision threshold saved beside the model (model.json), else 0.5."""
    parent = posixpath.dirname(model_uri) if storage.is_s3(model_uri) else os.path.dirname(model_uri)
    try:
        return float(json.loads(storage.read_bytes(storage.join(parent, "model.json")))["threshold"])
    except (OSError, KeyError, ValueError, TypeError):
        return 0.5


def load_keras_model(uri: str):
    """The Keras model in a local or s3:// .keras file; safe_mode, no optimizer."""
    from happysad.model import load_model

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as f:
            f.write(storage.read_bytes(uri))
        return load_model(path)


def decode_batch(batch: dict, max_bytes: int) -> dict:
    """Read what is not read yet, decode: {path, image (n, 256, 256, 3) uint8, error, error_detail}."""
    batch = inputs.read_files(batch, max_bytes)
    errors, details = batch["error"], batch["error_detail"]
    images = np.zeros((len(errors), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, data in enumerate(batch["bytes"]):
        if errors[i]:
            continue
        try:
            images[i] = decode_image(data)
        except DecodeError as exc:
            errors[i], details[i] = exc.reason, inputs.describe(exc)
        except Exception as exc:  # noqa: BLE001 - decode_image should raise only DecodeError; whatever else is this row's
            errors[i], details[i] = "not_an_image", inputs.describe(exc)
    return {"path": list(batch["path"]), "image": images, "error": errors, "error_detail": details}


def _one_core_per_call() -> None:
    """TensorFlow's ops on one thread per call: a replica's concurrent calls (CALLS_PER_REPLICA) then take a core
    each, instead of each call spreading over every core (2,000 faces in this process: 20.0 s -> 14.6 s here)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with contextlib.suppress(RuntimeError):  # TensorFlow already running in this process: its pools stay
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(CALLS_PER_REPLICA)


class Replica:
    """A model replica: predicts decoded batches, and decodes first when given undecoded rows (CPU placement).

    The model is called through Keras only, so any Keras backend scores (TensorFlow,
    JAX, torch). Batches are padded to one fixed size: one trace, one compilation.
    """

    def __init__(self, model: Model, batch_size: int, max_bytes: int):
        import cv2

        cv2.setNumThreads(1)  # decode threads run in parallel (cv2 releases the GIL); no nested pools
        _one_core_per_call()
        self.model, self.batch_size, self.max_bytes = model, batch_size, max_bytes
        self.keras_model = load_keras_model(model.uri)
        self._predict(np.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))  # compile before data arrives
        import keras

        console.say(f"ready: keras backend {keras.backend.backend()}, model {model.id}")

    def _predict(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        padded = np.zeros((self.batch_size, *images.shape[1:]), np.uint8)
        scores = []
        for start in range(0, n, self.batch_size):
            chunk = images[start : start + self.batch_size]
            padded[: len(chunk)] = chunk
            scores.append(np.asarray(self.keras_model.predict_on_batch(padded))[: len(chunk), 0])
        return np.concatenate(scores).astype(np.float32) if scores else np.empty(0, np.float32)

    def __call__(self, batch: dict) -> pa.Table:
        if "image" not in batch:
            batch = decode_batch(batch, self.max_bytes)
        errors = [e if isinstance(e, str) and e else None for e in batch["error"]]
        details = [d if isinstance(d, str) and e else None for d, e in zip(batch["error_detail"], errors)]
        ok = np.array([e is None for e in errors], bool)
        scores = np.full(len(errors), np.nan, np.float32)
        if ok.any():
            scores[ok] = self._predict(batch["image"][ok])
        labels = decided_labels(scores, self.model.threshold)
        return pa.table(
            {
                "path": list(batch["path"]),
                "score": pa.array(scores, pa.float32(), mask=~ok),
                "label": pa.array(labels, pa.string(), mask=~ok),
                "error": pa.array(errors, pa.string()),
                "model": [self.model.id] * len(errors),
                "error_detail": pa.array(details, pa.string()),
            },
            schema=score_output.SCHEMA,
        )


def decided_labels(scores: np.ndarray | float, threshold: float) -> np.ndarray:
    """The label of each score by the one rule (metrics.called_sad); one score: a 0-d array, str() of it is the label."""
    return np.where(metrics.called_sad(scores, threshold), "sad", "happy")


# --- the pipeline ------------------------------------------------------------------------------


def _replica_pool(config: ScoreConfig) -> ray.data.ActorPoolStrategy:
    """--concurrency replicas, or by default a pool from one up to what the cluster grows to.

    Sizing from the resources seen at start would pin an autoscaling cluster
    (whose workers start at zero) to one replica: nodes that join later are used.
    """
    threads = {} if config.gpu else {"max_concurrent_calls_per_actor": CALLS_PER_REPLICA, "enable_true_multi_threading": True}
    if config.concurrency:
        return ray.data.ActorPoolStrategy(size=config.concurrency, **threads)
    return ray.data.ActorPoolStrategy(min_size=1, max_size=None, **threads)


def _file_blocks(files: pa.Table, config: ScoreConfig) -> list[pa.Table]:
    """The listing cut into blocks of BATCHES_PER_BLOCK whole model batches (at most --rows-per-file paths).

    Not sized from the CPUs seen at start: an autoscaling cluster starts small, and
    queued blocks are what new replicas and decode tasks on joining nodes take. Cut
    here, not by `repartition`: its task needs a CPU, which replicas holding every
    CPU (`--concurrency` = the cluster's CPUs) would never leave it.
    """
    per_block = _rows_per_block(config)
    return [files.slice(start, per_block) for start in range(0, files.num_rows, per_block)]


def _rows_per_block(config: ScoreConfig) -> int:
    return min(config.batch_size * BATCHES_PER_BLOCK, config.rows_per_file)


def _write_staged(pipeline, staging: str, config: ScoreConfig) -> None:
    """The replicas' rows as Parquet files of up to --rows-per-file rows: whole blocks are gathered until the
    next one could overflow a file (a block is at most _rows_per_block rows), then written by one task.
    One file and one write task a block would make 80 files of 256 rows for 20,000 inputs; the rows a
    killed run scores again are the gathered ones, at most --rows-per-file."""
    fs, path = storage.filesystem(staging)
    gathered = config.rows_per_file - _rows_per_block(config) + 1  # >= 1: a block is never larger than a file
    pipeline.write_parquet(path, filesystem=fs, min_rows_per_file=gathered, max_rows_per_file=config.rows_per_file)


IN_PROCESS_MAX = 2_000  # inputs (files plus archive members) a job with no cluster scores in this process, at most...
IN_PROCESS_ARCHIVE_BYTES = 64 << 20  # ...with archives of at most this many bytes in all


def runs_in_process(config: ScoreConfig, todo: inputs.Inputs) -> bool:
    """Whether this job is scored in this process, without Ray: a small job (IN_PROCESS_MAX) with no cluster
    named (RAY_ADDRESS unset), no --gpu and no --concurrency. On 2 cores, starting Ray and a replica process
    costs more than such a job takes (bench/score_bench.py); the rows, the resume and the one-row guarantee
    are the same, because the same functions read, decode and predict."""
    archive_bytes = sum(a.size for a in todo.archives)
    return (
        not os.environ.get("RAY_ADDRESS") and not config.gpu and not config.concurrency
        and todo.files.num_rows + archive_bytes // (16 << 10) <= IN_PROCESS_MAX  # a member is a 16 KB face at least
        and archive_bytes <= IN_PROCESS_ARCHIVE_BYTES
    )


def score_in_process(config: ScoreConfig, model: Model, todo: inputs.Inputs, done: np.ndarray, staging: str) -> None:
    """The pipeline's rows, made here: the same reads, decode and replica, two batches at a time in threads (as a
    replica runs them: OpenCV and the model release the GIL), written as Parquet files into `staging`."""
    from concurrent.futures import ThreadPoolExecutor

    replica = Replica(model, config.batch_size, config.max_bytes)
    with ThreadPoolExecutor(CALLS_PER_REPLICA) as pool, score_output.StagedWriter(staging, config.rows_per_file) as out:
        pending = []
        for batch in _local_batches(config, todo, done):
            pending.append(pool.submit(replica, batch))
            if len(pending) > CALLS_PER_REPLICA:  # a bounded window: an archive's members are never all in memory
                out.write(pending.pop(0).result())
        for future in pending:
            out.write(future.result())


def _local_batches(config: ScoreConfig, todo: inputs.Inputs, done: np.ndarray):
    """Model batches of rows to read: the listed files, then each archive's members as its reader yields them."""
    blocks = iter(_file_blocks(todo.files, config))
    for archive in todo.archives:
        blocks = itertools.chain(blocks, inputs.read_archive({"path": [archive.uri], "source": [archive.source]}, config.max_bytes, done))
    for block in blocks:
        for start in range(0, block.num_rows, config.batch_size):
            yield block.slice(start, config.batch_size).to_pydict()


def build_pipeline(config: ScoreConfig, model: Model, found: inputs.Inputs, done: np.ndarray):
    with warnings.catch_warnings(), _bounded_flight(found.archives):
        # Retry bounds reach map_batches only through `**ray_remote_args`, which Ray 2.60 deprecates with
        # no named replacement for them (ray-project/ray#65227 names the others). The bounds are kept and
        # only this warning is silenced: without them a batch that kills its process is retried forever.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        return _pipeline(config, model, found, done)


@contextlib.contextmanager
def _bounded_flight(archives: list[storage.Listed]):
    """Datasets made inside hold at most IN_FLIGHT_PER_CPU per cluster CPU in the object store, in blocks
    of inputs.BLOCK_BYTES, when a compressed tar is among the inputs (Ray Data snapshots the context).

    A gzip stream has no offsets to point at: its reader sends the members' bytes, and Ray
    Data would let it run ahead of the replicas up to its share of the whole object store
    (a 1 GB tar.gz: 840 MB in the reader). Bounded, the reader and the replicas hold what
    the consumers can take, whatever the archive's size.
    """
    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size, context.execution_options.resource_limits
    if any(inputs.is_compressed_tar(a.uri) for a in archives):
        cpus = ray.cluster_resources().get("CPU", 1)
        context.target_max_block_size = inputs.BLOCK_BYTES
        limit = max(IN_FLIGHT_FLOOR, int(cpus * IN_FLIGHT_PER_CPU))
        context.execution_options.resource_limits = saved[1].copy(object_store_memory=limit)
    try:
        yield
    finally:
        context.target_max_block_size, context.execution_options.resource_limits = saved


def _pipeline(config: ScoreConfig, model: Model, found: inputs.Inputs, done: np.ndarray):
    worker_env = console.task_runtime_env()
    # A task or replica lost with its node is run again, a bounded number of times (Ray Data's default
    # is forever): a batch that kills every process it reaches fails the job instead of hanging it.
    node_loss_retries = 3
    parts = []
    if found.files.num_rows:
        parts.append(ray.data.from_arrow(_file_blocks(found.files, config)))
    if archives := found.archives:
        listed = ray.data.from_items([{"path": a.uri, "source": a.source} for a in archives], override_num_blocks=len(archives))
        done_ref = ray.put(done)  # one shared copy in the object store, not one per task
        parts.append(
            listed.map_batches(
                inputs.read_archive,
                batch_size=1,
                fn_kwargs={"max_bytes": config.max_bytes, "done": done_ref},
                # What one streaming reader holds. Remote args unlike the replicas' also keep Ray from
                # fusing the reader into a replica, which would decode a whole archive in one process.
                memory=inputs.READER_MEMORY,
                # Reading is I/O (members are decoded by the replicas), and a reader that needed a CPU
                # would never start while replicas hold every CPU (`--concurrency` = the cluster's CPUs).
                num_cpus=0,
                # ...so without a cap Ray would start a reader, each a Python process, for every archive
                # that fits in memory at once: 300 archives started 38 workers on 2 cores.
                compute=ray.data.TaskPoolStrategy(size=min(len(archives), max(READERS_MIN, int(2 * ray.cluster_resources().get("CPU", 0))))),
                runtime_env=worker_env,
                max_retries=node_loss_retries,
            )
        )
    if not parts:
        return None
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if config.gpu:  # decode on every CPU of the cluster; replicas only predict
        ds = ds.map_batches(
            decode_batch, fn_kwargs={"max_bytes": config.max_bytes}, batch_size=config.batch_size, num_cpus=1,
            runtime_env=worker_env, max_retries=node_loss_retries,
        )
    return ds.map_batches(
        Replica,
        fn_constructor_kwargs={"model": model, "batch_size": config.batch_size, "max_bytes": config.max_bytes},
        batch_size=config.batch_size,
        compute=_replica_pool(config),
        num_gpus=1 if config.gpu else 0,
        num_cpus=0 if config.gpu else 1,
        runtime_env=worker_env,
        # A replica lost with its node starts again on another and scores again the batches it held. Those
        # are not counted: while it restarts each resubmission fails at once; the restarts bound them.
        max_restarts=node_loss_retries,
        max_task_retries=-1,
    )



def run(config: ScoreConfig) -> dict:
    """Score every input not yet in --output; print and return a summary."""
    model = open_model(config.model, config.threshold)
    found = inputs.expand(list(config.inputs), config.output)
    score_output.check_output(config.output)
    for uri in found.empty:  # not an error: an incoming folder may be empty today
        print(f"warning: --input {uri}: no files in it", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with lock.held(storage.join(config.output, ".lock"), "--output", config.output):
        score_output.finish_staged(config.output)
        score_output.check_record(config.output, model)
        score_output.retire_read_failed(config.output, found)
        done = score_output.done_hashes(config.output)
        todo = inputs.pending(found, done)
        new_rows, scoring_started = 0, time.perf_counter()
        staging = score_output.new_staging(config.output)
        if (todo.files.num_rows or todo.archives) and runs_in_process(config, todo):
            score_in_process(config, model, todo, done, staging)
            new_rows = score_output.finish_staged(config.output)
        elif todo.files.num_rows or todo.archives:  # nothing left to score: no Ray start at all
            console.join_ray()
            gpus.refuse_unless_one_can_come(config.gpu)
            from happysad import progress  # Ray Data's execution hooks: imported once Ray is up

            with progress.reporting("scored", todo.files.num_rows, bool(todo.archives)):
                pipeline = build_pipeline(config, model, todo, done)
                scoring_started = time.perf_counter()
                _write_staged(pipeline, staging, config)
            new_rows = score_output.finish_staged(config.output)
        scoring_ended = time.perf_counter()
        # _summary.json and _report.html from every row the output holds (a rerun's too), in one pass, under the lock
        report = score_report.write(config.output, model.uri, model.threshold, model.id)
    seconds = scoring_ended - scoring_started
    rows, labels, errors = report["rows"], report["labels"], report["errors"]  # the report's pass counted them
    summary = {
        "rows": rows,
        "new_rows": new_rows,
        "labels": labels,
        "errors": errors,
        "hidden_skipped": found.hidden,
        "images_per_second": new_rows / seconds if new_rows else 0.0,  # over the scoring phase, start-up apart
        "startup_seconds": scoring_started - started,
        "output": config.output,
    }
    hidden = f"; {found.hidden} hidden files skipped" if found.hidden else ""
    counts = ", ".join(f"{labels.get(c, 0)} {c}" for c in CLASSES)
    print(
        f"scored {new_rows} inputs in {seconds:.1f} s ({summary['images_per_second']:.1f} img/s; start-up "
        f"{summary['startup_seconds']:.1f} s); {rows} rows in all: {counts}; errors: {errors or 'none'}{hidden}; "
        f"output: {config.output}",
        file=sys.stdout,
        flush=True,
    )
    drift = report["drift"]
    measured = f"PSI {drift['psi']:.3f} ({drift['psi_level']}), KS {drift['ks']:.3f}" if drift["psi"] is not None else f"not measured: {drift['reason']}"
    summary |= {"report": storage.join(config.output, score_report.PAGE), "drift": drift}
    print(f"report: {summary['report']}; drift against validation: {measured}", file=sys.stdout, flush=True)
    return summary
