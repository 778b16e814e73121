"""Training on Ray: decode in Ray Data, split by content hash, Ray Train workers run train_loop.

    URIs -> sources -> decode (Ray Data, CPU) -> drop undecodable (counted)
         -> split -> TensorflowTrainer(train_loop_per_worker) -> run directory
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow.fs as pafs

from happysad import report, sources, storage, synth
from happysad.decode import DecodeError, decode_image
from happysad.split import SPLITS, split_of
from happysad.storage import UsageError
from happysad.train_loop import train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    data: tuple[str, ...] = ()  # folders / s3:// prefixes; empty = the embedded demo set
    output: str = ""  # run directory, local or s3://; empty = runs/<UTC timestamp>
    workers: int = 1  # Ray Train workers, one tf.distribute replica each
    gpu: bool = False  # one GPU per worker
    one_per_node: bool = False  # place each worker on a different node (STRICT_SPREAD)
    epochs: int = 10
    batch_size: int = 32  # global batch, split across workers
    learning_rate: float = 0.001
    seed: int = 0  # same seed + same data = same split and init
    val_fraction: float = 0.2
    test_fraction: float = 0.1
    resume: bool = False  # continue from the last checkpoint under output
    max_failures: int = 3  # worker-group restarts from the last checkpoint before giving up
    collective_timeout_s: float = 600  # a collective stuck this long fails instead of hanging

    def __post_init__(self):
        checks = {
            "--workers": self.workers >= 1,
            "--epochs": self.epochs >= 1,
            "--batch-size": self.batch_size >= self.workers,
            "--learning-rate": self.learning_rate > 0,
            "--val-fraction": 0 <= self.val_fraction < 1,
            "--test-fraction": 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
        }
        for flag, ok in checks.items():
            if not ok:
                value = getattr(self, flag[2:].replace("-", "_"))
                raise UsageError(f"{flag} {value} is out of range")
        if self.resume and not self.output:
            raise UsageError("--resume needs --output naming the run to continue")



def decode_for_training(batch: dict, seed: int, val_fraction: float, test_fraction: float) -> dict:
    """Decode a batch; undecodable or unlabelled rows keep a zero image and a reason in `error`."""
    n = len(batch["bytes"])
    images = np.zeros((n, 256, 256, 3), np.uint8)
    errors, splits = [""] * n, []
    for i, (data, label) in enumerate(zip(batch["bytes"], batch["label"])):
        splits.append(split_of(data, seed, val_fraction, test_fraction))
        try:
            images[i] = decode_image(data)
        except DecodeError as exc:
            errors[i] = exc.reason
        if label not in sources.CLASSES:
            errors[i] = errors[i] or "no_label"
    labels = [sources.CLASSES.index(x) if x in sources.CLASSES else -1 for x in batch["label"]]
    return {"image": images, "label": np.array(labels, np.int8), "split": splits, "error": errors}


def select_split(batch: dict, split: str) -> dict:
    """The decodable rows of one split, each with weight 1."""
    keep = (batch["split"] == split) & (batch["error"] == "")
    return {"image": batch["image"][keep], "label": batch["label"][keep], "weight": np.ones(int(keep.sum()), np.float32)}


def zero_weight(batch: dict) -> dict:
    """Padding rows: present so every worker gets the same count, but counting for nothing."""
    return batch | {"weight": np.zeros(len(batch["label"]), np.float32)}


def prepare_datasets(config: TrainConfig, uris: list[str], workers: int):
    """Decode once (materialized), count, and split.

    Returns (datasets per split, counts per split and class, skipped by reason,
    rows per split including padding, real rows per split).
    """
    labelled = sources.labelled_images(uris, shuffle_seed=config.seed)
    decoded = labelled.map_batches(
        decode_for_training,
        fn_kwargs={"seed": config.seed, "val_fraction": config.val_fraction, "test_fraction": config.test_fraction},
        batch_size=32,
    ).materialize()
    counts, skipped = Counter(), Counter()
    for batch in decoded.select_columns(["label", "split", "error"]).iter_batches(batch_format="numpy", batch_size=4096):
        for label, split, error in zip(batch["label"], batch["split"], batch["error"]):
            if error:
                skipped[error] += 1
            else:
                counts[(split, sources.CLASSES[label])] += 1
    real = {s: sum(counts[(s, c)] for c in sources.CLASSES) for s in SPLITS}
    if real["train"] == 0:
        raise UsageError(f"--data {' '.join(uris)}: no decodable labelled training images (skipped: {dict(skipped)})")
    datasets, rows = {}, {}
    for split in SPLITS:
        ds = decoded.map_batches(select_split, fn_kwargs={"split": split}, batch_format="numpy")
        extra = (-real[split]) % workers if split != "train" and real[split] else 0
        if extra:  # Ray Train splits equally, dropping the remainder: pad instead of losing real rows
            ds = ds.union(ds.limit(extra).map_batches(zero_weight, batch_format="numpy"))
        ds = ds.materialize()
        # A fresh block order each epoch; the workers' shuffle buffer mixes within blocks.
        datasets[split] = ds.randomize_block_order() if split == "train" else ds
        rows[split] = real[split] + extra
    count_table = {s: {c: counts[(s, c)] for c in sources.CLASSES} for s in SPLITS}
    return datasets, count_table, dict(skipped), rows, real


def _output_uri(config: TrainConfig) -> str:
    if config.output:
        return config.output if storage.is_s3(config.output) else str(storage.filesystem(config.output)[1])
    return str(storage.filesystem(f"runs/{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")[1])


def _check_output(output: str, resume: bool) -> None:
    kind = storage.file_type(output)
    exists = kind == pafs.FileType.Directory and storage.list_dir(output)
    if resume and not exists:
        raise UsageError(f"--output {output}: nothing to resume there")
    if not resume and exists:
        raise UsageError(f"--output {output}: already holds a run; pass --resume to continue it or choose another folder")
    if kind == pafs.FileType.File:
        raise UsageError(f"--output {output}: is a file")


def _trainer(config: TrainConfig, output: str, datasets: dict, loop_config: dict):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    fs, path = storage.filesystem(output)
    parent, name = path.rsplit("/", 1)
    return TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.gpu,
            placement_strategy="STRICT_SPREAD" if config.one_per_node else "PACK",
        ),
        run_config=RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )


def run(config: TrainConfig) -> dict:
    """Train, write the run directory, and return metrics.json's content."""
    output = _output_uri(config)
    _check_output(output, config.resume)
    uris = list(config.data) or [str(synth.demo_data())]
    started = time.perf_counter()
    datasets, counts, skipped, rows, real = prepare_datasets(config, uris, config.workers)
    log.info("data: %s; skipped: %s", counts, skipped or "none")
    loop_config = {"config": config, "rows": rows, "real": real}
    result = _trainer(config, output, datasets, loop_config).fit()
    returned = result.return_value
    metrics = {
        "val": returned["val"],
        "test": returned["test"],
        "images_per_second": float(np.mean([r["images_per_second"] for r in returned["history"]])),
        "skipped": skipped,
        "counts": counts,
        "epochs": len(returned["history"]),
        "workers": config.workers,
        "replica_weight_hashes": returned["replica_weight_hashes"],
        "wall_seconds": time.perf_counter() - started,
        "config": asdict(config),
    }
    report.write_run(output, returned["model"], metrics, returned["history"], returned["tensorboard"])
    test = metrics["test"]
    print(
        f"done: test accuracy {test['accuracy']:.4f}  auc {test['auc']:.4f}  (n={test['n']})  "
        f"{metrics['images_per_second']:.1f} img/s  skipped {sum(skipped.values())}  run: {output}",
        flush=True,
    )
    return metrics
