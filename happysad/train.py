"""Training on Ray: decode in Ray Data, split by content hash, Ray Train workers run train_worker.

    URIs -> sources -> index: decode every row once, keep (label, split, hash, error)
         -> counts, conflicts, checks -> each split, padded to a multiple of the workers
         -> DataParallelTrainer(train_loop_per_worker, StrategyConfig) -> run directory

Cache: when the decoded images fit CACHE_FRACTION of Ray's object store, the
index keeps them and each split is materialized from it (decoded once, reused
every epoch); otherwise each epoch reads and decodes its split again,
streaming, and only the small index is kept. Both deliver the same rows in the same order (listing order, shuffled
by the seed; execution with preserve_order), so a run's batches do not
depend on the cache with one worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from happysad import console, gpus, inputs, predictions, report, run_files, score, sources, storage, synth
from happysad.decode import DecodeError, decode_image
from happysad.metrics import binary_metrics, choose_threshold, shown
from happysad.model import CLASSES, IMAGE_SIZE
from happysad.split import SPLITS, split_of
from happysad.storage import UsageError
from happysad.train_worker import train_loop_per_worker

log = logging.getLogger(__name__)

# A resume that changed one of these would mix two runs: another split, batch or optimizer.
RESUME_GUARDED = ("data", "seed", "val_fraction", "test_fraction", "learning_rate", "batch_size", "workers")
CACHE_MODES = ("auto", "memory", "none")
CACHE_FRACTION = 0.5  # --cache auto caches decoded images that fit this share of the object store (held twice while split)
DECODED_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3  # one decoded image in the object store
WORKER_START_TIMEOUT_S = 600  # how long one try to place the worker group waits for nodes (an autoscaler adds them)


@dataclass(frozen=True)
class TrainConfig:
    data: tuple[str, ...] = ()  # folders / s3:// prefixes; empty = the embedded demo set
    output: str = ""  # run directory, local or s3://; empty = a new runs/<UTC time>-<random>
    workers: int = 1  # Ray Train workers, one tf.distribute replica each
    gpu: bool = False  # one GPU per worker
    one_per_node: bool = False  # place each worker on a different node (STRICT_SPREAD)
    epochs: int = 10
    batch_size: int = 32  # global batch, split evenly across workers
    learning_rate: float = 0.001
    seed: int = 0  # same seed + same data = same split and init
    val_fraction: float = 0.2
    test_fraction: float = 0.1
    resume: bool = False  # continue from the last checkpoint under output
    allow_one_class: bool = False  # train even when the data holds only happy or only sad images
    cache: str = "auto"  # keep decoded images in the object store across epochs: auto (if they fit), memory, none
    max_failures: int = 3  # worker-group restarts from the last checkpoint before giving up
    collective_timeout_s: float = 600  # a collective stuck this long fails instead of hanging

    def __post_init__(self):
        checks = {
            "--workers": self.workers >= 1,
            "--epochs": self.epochs >= 1,
            "--max-failures": self.max_failures >= 0,
            "--batch-size": self.batch_size >= self.workers,
            "--learning-rate": self.learning_rate > 0,
            "--seed": 0 <= self.seed < 2**32,  # what TF's and numpy's seeding accept
            "--val-fraction": 0 <= self.val_fraction < 1,
            "--test-fraction": 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
        }
        for flag, ok in checks.items():
            if not ok:
                value = getattr(self, flag[2:].replace("-", "_"))
                raise UsageError(f"{flag} {value} is out of range")
        if self.cache not in CACHE_MODES:
            raise UsageError(f"--cache {self.cache}: expected one of {', '.join(CACHE_MODES)}")
        if self.batch_size % self.workers:
            raise UsageError(f"--batch-size {self.batch_size} is not a multiple of --workers {self.workers}")
        if self.resume and not self.output:
            raise UsageError("--resume needs --output naming the run to continue")
        if storage.is_s3(self.output) and "/" not in self.output[len("s3://") :].strip("/"):
            raise UsageError(f"--output {self.output}: a bucket root cannot hold a run; name a folder, e.g. {self.output.rstrip('/')}/runs/exp1")


def decode_for_training(
    batch: dict, seed: int, val_fraction: float, test_fraction: float, keep_images: bool = True, only: str | None = None
) -> dict:
    """Decode a batch; unusable rows keep a zero image and their reason in `error`.

    A row that sources already marked (e.g. read_failed) keeps that reason and is
    not decoded. `hash` identifies the bytes, so contradicting copies can be found.
    Without `keep_images` the rows are still decoded (to find the unusable ones)
    but come back without an image column: an index. With `only`, rows of other
    splits are not decoded.
    """
    n = len(batch["bytes"])
    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8) if keep_images else None
    errors, splits, hashes = [""] * n, [""] * n, [""] * n
    for i, (data, label, error) in enumerate(zip(batch["bytes"], batch["label"], batch["error"])):
        if isinstance(error, str) and error:  # "no error" can arrive as None or NaN (an all-null column)
            errors[i] = error
            continue
        splits[i] = split_of(data, seed, val_fraction, test_fraction)
        hashes[i] = hashlib.blake2b(data, digest_size=16).hexdigest()
        if only is None or splits[i] == only:
            try:
                image = decode_image(data)
                if keep_images:
                    images[i] = image
            except DecodeError as exc:
                errors[i] = exc.reason
        if label not in CLASSES:
            errors[i] = errors[i] or "no_label"
    labels = [CLASSES.index(x) if x in CLASSES else -1 for x in batch["label"]]
    rows = {"path": np.asarray(batch["path"]), "label": np.array(labels, np.int8), "split": splits, "hash": hashes, "error": errors}
    return rows | {"image": images} if keep_images else rows


def decode_split(batch: dict, split: str, conflicts: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict:
    """The usable rows of one split, decoded (only that split's rows are): the streamed path's per-epoch map."""
    return select_split(decode_for_training(batch, seed, val_fraction, test_fraction, only=split), split, conflicts)


def select_split(batch: dict, split: str, conflicts: list[str]) -> pa.Table:
    """The usable rows of one split, each with weight 1; the val and test splits' with their path (their
    scores are written with it: val's choose the threshold, test's are the report's rows).

    A table, not a dict of arrays: Ray cannot type a 0-row image array (a batch
    with no row of this split) and would store the column as pickled objects.
    """
    from ray.data.extensions import ArrowTensorArray

    keep = (np.asarray(batch["split"]) == split) & (np.asarray(batch["error"]) == "") & ~np.isin(batch["hash"], conflicts)
    image = ArrowTensorArray.from_numpy(np.asarray(batch["image"])[keep])
    columns = {"image": image, "label": np.asarray(batch["label"])[keep], "weight": np.ones(int(keep.sum()), np.float32)}
    if split in ("val", "test"):
        columns["path"] = pa.array(np.asarray(batch["path"])[keep].tolist(), pa.string())
    return pa.table(columns)


def zero_weight(batch: dict) -> dict:
    """Padding rows: present so every worker gets the same count, but counting for nothing."""
    return batch | {"weight": np.zeros(len(batch["label"]), np.float32)}


def padding_rows(real: int, workers: int) -> int:
    """Weight-0 rows that bring a split of `real` rows to a multiple of `workers` (none for an empty split)."""
    return (-real) % workers if real else 0


def pad_to_multiple(ds, real: int, workers: int):
    """`ds` (of `real` rows) plus weight-0 copies of its first rows, up to a multiple of `workers` rows.

    Ray Train splits equally and drops the remainder: padding means no real row is
    dropped. Rows repeat as often as needed, so 1 row and 4 workers give 4 rows.
    The copies (at most workers - 1) are materialized: a streamed `ds` is not read twice.
    """
    extra = padding_rows(real, workers)
    if extra == 0:
        return ds
    first = ds.limit(min(extra, real)).materialize()
    copies = -(-extra // first.count())  # ceil: enough copies to take `extra` rows from
    repeated = first.union(*[first] * (copies - 1)) if copies > 1 else first
    return ds.union(repeated.limit(extra).map_batches(zero_weight, batch_format="numpy").materialize())


def count_rows(index) -> tuple[Counter, Counter, set[str]]:
    """(usable rows per (split, class), unusable rows per reason, conflicting hashes), in one pass over the index.

    A conflict is a file found under both labels (byte-identical copies that contradict each
    other): every copy is skipped as `conflicting_label`. The driver keeps 34 bytes per
    usable row (hash, label, split): 34 MB for a million images.
    """
    skipped = Counter()
    hashes, labels, splits = [np.array([], "S32")], [np.array([], np.int8)], [np.array([], np.int8)]
    for batch in index.select_columns(["label", "split", "hash", "error"]).iter_batches(batch_format="numpy", batch_size=65536):
        ok = batch["error"] == ""
        skipped.update(batch["error"][~ok].tolist())
        hashes.append(batch["hash"][ok].astype("S32"))
        labels.append(batch["label"][ok].astype(np.int8))
        splits.append(np.select([batch["split"][ok] == name for name in SPLITS], range(len(SPLITS)), -1).astype(np.int8))
    hashes, labels, splits = np.concatenate(hashes), np.concatenate(labels), np.concatenate(splits)
    conflicts = np.intersect1d(hashes[labels == 0], hashes[labels == 1])
    clear = ~np.isin(hashes, conflicts)
    skipped["conflicting_label"] += int(np.sum(~clear))
    per_key = np.bincount(splits[clear] * 2 + labels[clear], minlength=len(SPLITS) * 2)
    counts = Counter({(split, label): int(per_key[i * 2 + j]) for i, split in enumerate(SPLITS) for j, label in enumerate(CLASSES)})
    return counts, +skipped, {h.decode() for h in conflicts.tolist()}


@dataclass(frozen=True)
class Prepared:
    datasets: dict  # split -> Ray Dataset of {image, label, weight} (and the test split's path), padded
    counts: dict  # split -> class -> usable rows
    skipped: dict  # reason -> rows (listing and reading included)
    rows: dict  # split -> rows including padding
    real: dict  # split -> usable rows
    cache: dict  # {"mode": "memory" | "none", "reason": why}


def prepare_datasets(config: TrainConfig, listing: sources.Listing) -> Prepared:
    """Index every row, count, refuse unusable data, then each split, padded (cached or streamed: `--cache`)."""
    split_args = {"seed": config.seed, "val_fraction": config.val_fraction, "test_fraction": config.test_fraction}
    with _ordered():
        labelled = sources.labelled_images(listing, shuffle_seed=config.seed)
        listing_skipped = listing.skipped
        cache = choose_cache(config, listing, labelled)
        print(f"cache: {cache['mode']} ({cache['reason']})", flush=True)
        memory = cache["mode"] == "memory"
        # The index keeps the decoded images only when they are the cache; streamed, it is a few bytes a row.
        index = labelled.map_batches(decode_for_training, fn_kwargs=split_args | {"keep_images": memory}, batch_size=32)
        index = index.materialize()
        counts, skipped, conflicts = count_rows(index)
        skipped.update(listing_skipped)
        count_table = {s: {c: counts[(s, c)] for c in CLASSES} for s in SPLITS}
        _check_counts(config, listing.uris, count_table, skipped)
        datasets, rows, real = {}, {}, {}
        for split in SPLITS:
            real[split] = sum(count_table[split].values())
            chosen = {"split": split, "conflicts": sorted(conflicts)}
            if memory:
                ds = index.map_batches(select_split, fn_kwargs=chosen, batch_format="numpy")
            else:  # each epoch reads again and decodes only this split's rows
                ds = labelled.map_batches(decode_split, fn_kwargs=chosen | split_args, batch_size=32)
            ds = pad_to_multiple(ds, real[split], config.workers)
            # Cached splits are materialized: an epoch then runs no Ray task, so the workers may hold every CPU.
            # Until `index` is released on return the decoded images are held twice (hence CACHE_FRACTION).
            datasets[split] = ds.materialize() if memory else ds
            rows[split] = real[split] + padding_rows(real[split], config.workers)
    return Prepared(datasets, count_table, dict(skipped), rows, real, cache)


@contextmanager
def _ordered():
    """Datasets made inside keep their rows in order (Ray Data snapshots the context at creation).

    The order is then the listing's, shuffled by the seed in sources, in both cache modes.
    """
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    saved, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = saved


def choose_cache(config: TrainConfig, listing: sources.Listing, labelled) -> dict:
    """--cache's decision for this data on this cluster: {"mode": "memory" | "none", "reason": ...}."""
    import ray

    resources = ray.cluster_resources()
    images, how = count_images(listing, labelled) if config.cache == "auto" else (0, "")
    store, cpus = resources.get("object_store_memory", 0), resources.get("CPU", 0)
    return cache_mode(config.cache, images, how, store, cpus, config.workers)


def cache_mode(flag: str, images: int, how: str, store: float, cpus: float, workers: int) -> dict:
    """Cache in memory when the decoded images fit CACHE_FRACTION of the object store, else stream.

    Streaming decodes while the workers train, so it needs a CPU that they (one
    each) do not hold: without one its read tasks would wait forever. Fewer CPUs
    than workers means the cluster has yet to grow, which cannot be judged now.
    """
    no_spare_cpu = workers <= cpus < workers + 1
    if flag == "none" and no_spare_cpu:
        raise UsageError(
            f"--cache none: the {workers} workers hold all {cpus:g} CPUs and streaming needs one more to decode; "
            "use --cache memory or fewer --workers"
        )
    if flag != "auto":
        return {"mode": flag, "reason": f"--cache {flag}"}
    decoded = images * DECODED_BYTES
    fits = decoded <= CACHE_FRACTION * store
    reason = (
        f"{images} images ({how}) decode to {decoded / 1e6:,.0f} MB, "
        f"{'within' if fits else 'over'} {CACHE_FRACTION:.0%} of the {store / 1e6:,.0f} MB object store"
    )
    if fits:
        return {"mode": "memory", "reason": reason}
    if no_spare_cpu:
        spare = f"; cached anyway: the {workers} workers hold all {cpus:g} CPUs, streaming needs one more (Ray spills the excess to disk)"
        return {"mode": "memory", "reason": reason + spare}
    return {"mode": "none", "reason": reason + ": decoding every epoch"}


def count_images(listing: sources.Listing, labelled) -> tuple[int, str]:
    """Rows the data will have, before anything is decoded, and how that was found.

    Class folders: files under happy/ or sad/ in the listing (an upper bound: a
    few may not decode). WebDataset shards hold an unknown number of samples:
    then a count pass reads the bytes, without decoding them.
    """
    if listing.shards:
        return labelled.count(), "counted: WebDataset shards read, not decoded"
    return len(listing.images), "from the listing"


def _check_counts(config: TrainConfig, uris: list[str], counts: dict, skipped: Counter) -> None:
    data = " ".join(uris)
    train = sum(counts["train"].values())
    if train == 0:
        raise UsageError(f"--data {data}: no decodable labelled training images (skipped: {dict(skipped)})")
    if train < config.workers:
        raise UsageError(f"--workers {config.workers}: the train split has only {train} images, fewer than the workers")
    # The train split is what the model learns from: one class there trains a constant model, whatever val and test hold.
    missing = [c for c in CLASSES if counts["train"][c] == 0]
    if missing and not config.allow_one_class:
        elsewhere = sum(counts[s][missing[0]] for s in SPLITS)
        where = f" ({elsewhere} in the val and test splits)" if elsewhere else ""
        raise UsageError(
            f"--data {data}: no usable {missing[0]} images in the train split{where}, so nothing to tell apart "
            "(--allow-one-class trains anyway)"
        )


def _given_output(config: TrainConfig) -> str | None:
    """--output as an absolute local path or an s3:// URI; None without it (a new runs/ folder is made later)."""
    if not config.output:
        return None
    return config.output.rstrip("/") if storage.is_s3(config.output) else str(storage.filesystem(config.output)[1])


def _new_run_dir() -> str:
    """A fresh runs/<UTC time to the ms>-<random>, created here (mkdir is atomic) so two runs never share one."""
    while True:
        now = datetime.now(timezone.utc)
        path = Path("runs", f"{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}-{secrets.token_hex(3)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return str(path.resolve())


def _check_output(output: str, resume: bool) -> None:
    kind = storage.file_type(output)
    exists = kind == pafs.FileType.Directory and storage.list_dir(output)
    if resume and not exists:
        raise UsageError(f"--output {output}: nothing to resume there")
    if not resume and exists:
        raise UsageError(f"--output {output}: already holds a run; pass --resume to continue it or choose another folder")
    if kind == pafs.FileType.File:
        raise UsageError(f"--output {output}: is a file")


def run_record(config: TrainConfig) -> dict:
    """config.json's content: the config, with --data as sorted absolute URIs so equal data compares equal."""
    data = sorted({inputs.absolute(uri) for uri in config.data})
    return asdict(config) | {"data": data}


def _check_resume(output: str, record: dict) -> None:
    """Refuse a resume whose flags would mix two runs (RESUME_GUARDED); before any Ray work."""
    path = storage.join(output, "config.json")
    if storage.file_type(path) != pafs.FileType.File:
        raise UsageError(f"--output {output}: no config.json, so --resume cannot check the run's flags")
    recorded = json.loads(storage.read_bytes(path))
    for field in RESUME_GUARDED:
        if recorded.get(field) != record[field]:
            flag = "--" + field.replace("_", "-")
            raise UsageError(
                f"{flag}: this resume says {_shown(record[field])}, the run used {_shown(recorded.get(field))}; "
                "a resume may only raise --epochs and change --gpu, --one-per-node, --max-failures or --allow-one-class"
            )
    if record["epochs"] < recorded["epochs"]:  # the checkpoint may already hold more epochs than asked for
        raise UsageError(
            f"--epochs: this resume says {record['epochs']}, the run used {recorded['epochs']}; a resume may raise it, not lower it"
        )


def _shown(value) -> str:
    if isinstance(value, list):
        return " ".join(value) or "(demo set)"
    return str(value)


def _trainer(config: TrainConfig, output: str, datasets: dict, loop_config: dict):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    # Ray Train's 60 s would fail a first start on an autoscaled cluster still adding its nodes (every
    # failed start counts against controller_failure_limit). Passed on by Ray Train to its controller.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(WORKER_START_TIMEOUT_S))

    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from happysad.train_backend import StrategyConfig

    fs, path = storage.filesystem(output)
    parent, name = path.rsplit("/", 1)  # never a bucket root: TrainConfig refuses it
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # rows reach the workers in the listing's (seeded) order, cached or streamed
    return DataParallelTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        backend_config=StrategyConfig(),
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.gpu,
            placement_strategy="STRICT_SPREAD" if config.one_per_node else "PACK",
        ),
        run_config=RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=fs,
            # A worker group that cannot be placed (a node lost, none left) fails its start and is retried:
            # bounded like worker failures, or the run waits forever. Each try waits WORKER_START_TIMEOUT_S.
            failure_config=FailureConfig(max_failures=config.max_failures, controller_failure_limit=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest),
    )


def _import_keras_meanwhile() -> threading.Thread:
    """The report's Grad-CAM thumbnails need Keras in this process after training. Importing it (5-8 s, one
    core) while Ray Train starts the workers takes it off the run's wall time; nothing else here needs it."""

    def load() -> None:
        with console.native_stderr_hidden():
            import keras  # noqa: F401

    thread = threading.Thread(target=load, name="import-keras", daemon=True)
    thread.start()
    return thread


def _fit(trainer, output: str) -> dict:
    from ray.train import TrainingFailedError

    try:
        return trainer.fit().return_value
    except TrainingFailedError as exc:
        checkpointed = any(i.base_name.startswith("checkpoint_") for i in storage.list_dir(output))
        then = f"its last checkpoint is in {output}: rerun with --resume" if checkpointed else "no checkpoint was written"
        raise storage.JobFailed(f"training failed ({_cause(exc)}); {then}") from None


def _cause(failed) -> str:
    """One line on why Ray Train gave up: the controller's error (a group it could not place), else the
    last line of the first worker's traceback. The full tracebacks are in Ray's log folder (and on the
    console with --verbose)."""
    controller = getattr(failed, "controller_failure", None)
    if controller is not None:
        return str(controller).split(". ")[0]
    workers = list(getattr(failed, "worker_failures", {}).values())
    lines = str(workers[0] if workers else failed).strip().splitlines() or [type(failed).__name__]
    return lines[-1][:300]


def run(config: TrainConfig) -> dict:
    """Train, write the run directory, and return metrics.json's content."""
    output = _given_output(config)
    if output:
        _check_output(output, config.resume)
    record = run_record(config)
    if config.resume:
        _check_resume(output, record)
    listing = sources.list_labelled(list(config.data) or [str(synth.demo_data())])  # a typo is answered here, before Ray
    started = time.perf_counter()
    console.join_ray()
    gpus.refuse_unless_one_can_come(config.gpu)
    data = prepare_datasets(config, listing)
    log.info("data: %s; skipped: %s", data.counts, data.skipped or "none")
    output = output or _new_run_dir()  # made only now: a run refused for its input leaves no empty folder
    # Recorded before the first checkpoint: a later --resume is checked against it.
    storage.write_bytes(storage.join(output, "config.json"), json.dumps(record, indent=2).encode())
    loop_config = {"config": config, "rows": data.rows, "counts": data.counts, "output": output}
    keras_imported = _import_keras_meanwhile()
    returned = _fit(_trainer(config, output, data.datasets, loop_config), output)
    keras_imported.join()
    # The threshold and the val and test metrics, from every real row's exact score (the workers' files).
    split_rows = {split: predictions.worker_predictions(output, split) for split in ("val", "test")}
    threshold = choose_threshold(*predictions.scores_and_sad(split_rows["val"]))
    measured = {
        split: binary_metrics(*predictions.scores_and_sad(rows), threshold["value"], empty=f"no {split} split")
        for split, rows in split_rows.items()
    }
    for split, result in measured.items():  # each real row once: a worker's missing or extra file would show here
        if result["n"] != data.real[split]:
            raise storage.JobFailed(f"the {split} split has {data.real[split]} images but {result['n']} scores were written")
    metrics = {
        "val": measured["val"],
        "test": measured["test"],
        "threshold": threshold,
        "images_per_second": float(np.mean([r["images_per_second"] for r in returned["history"]])),
        "skipped": data.skipped,
        "counts": data.counts,
        "epochs": len(returned["history"]),
        "workers": config.workers,
        "cache": data.cache,
        "replica_weight_hashes": returned["replica_weight_hashes"],
        "wall_seconds": time.perf_counter() - started,
        "config": record,
    }
    from happysad.metrics import score_histogram  # a scoring run's drift is measured against the val scores' histogram

    val_histogram = score_histogram(predictions.scores_and_sad(split_rows["val"])[0])
    model_info = run_files.model_json(threshold["value"], CLASSES, IMAGE_SIZE, val_histogram)
    with console.native_stderr_hidden():  # TensorFlow's first device use here prints "failed call to cuInit"
        write_run(output, returned["model"], model_info, metrics, returned["history"], returned["tensorboard"], split_rows)
    test = metrics["test"]
    why = f" (default: {threshold['reason']})" if threshold.get("reason") else ""
    print(
        f"done: test accuracy {shown(test, 'accuracy')}  auc {shown(test, 'auc')}  (n={test['n']})  "
        f"threshold {threshold['value']:.3f}{why}  "
        f"{metrics['images_per_second']:.1f} img/s  skipped {sum(data.skipped.values())}  run: {output}",
        flush=True,
    )
    return metrics


def write_run(
    output: str, model_bytes: bytes, model_info: bytes, metrics: dict, history: list[dict], tensorboard: dict[str, bytes],
    split_rows: dict[str, pa.Table],
) -> None:
    """Write the run directory; `split_rows`: each split's worker rows (`predictions.worker_predictions`), which
    metrics.json's numbers were computed from."""
    # model.json first: whoever finds model.keras also finds its threshold.
    storage.write_bytes(storage.join(output, "model.json"), model_info)
    storage.write_bytes(storage.join(output, "model.keras"), model_bytes)
    storage.write_bytes(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2).encode())
    storage.write_bytes(storage.join(output, "history.csv"), run_files.history_csv(history))
    storage.write_bytes(storage.join(output, "curves.png"), run_files.curves_png(history))
    for name, data in tensorboard.items():
        storage.write_bytes(storage.join(output, "tensorboard", name), data)
    # Last: the splits' predictions, labelled at the threshold in model.json written above, and the page of the test split.
    model = score.open_model(storage.join(output, "model.keras"))
    labelled = predictions.write_predictions(output, split_rows, model)
    storage.write_bytes(storage.join(output, "report.html"), report.training_page(output, labelled["test"], model, metrics, history))
