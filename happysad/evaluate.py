"""Evaluate a model on any labelled set: metrics, one prediction per file, and report.html.

    happysad evaluate --model runs/RUN --data s3://BUCKET/holdout/ --output evals/holdout
    ray job submit --working-dir . -- python jobs/evaluate.py --model s3://BUCKET/runs/exp1 \
        --data s3://BUCKET/holdout/ --output s3://BUCKET/evals/holdout --gpu

The labelled rows come from the same Ray Data read as training
(`sources.labelled_images`: class folders or WebDataset shards, local or S3)
and are scored by the same replicas as `score` (`score.Replica`, in the same
actor pool, with each row's `true_label` carried through). The driver then reads
back only (score, true_label) and computes every metric with numpy, so the
numbers in evaluation.json follow from predictions.parquet alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from happysad import console, gpus, inputs, report, score, sources, storage
from happysad.metrics import shown
from happysad.predictions import LABELLED_ROWS, evaluation
from happysad.storage import UsageError


@dataclass(frozen=True)
class EvaluateConfig:
    data: tuple[str, ...] = ()  # labelled folders / s3:// prefixes (happy/ sad/ or .tar shards)
    output: str = ""  # folder (local or s3://) for evaluation.json, predictions.parquet, report.html
    model: str = ""  # a .keras file or a run directory; empty = the newest run under runs/
    threshold: float | None = None  # None = the model's (model.json), else 0.5
    batch_size: int = 64  # images per model call
    concurrency: int = 0  # model replicas; 0 = a pool that grows with the cluster
    gpu: bool = False  # one GPU per replica
    max_file_mb: int = 64  # a larger file is `too_large`, never read

    def __post_init__(self):
        if not self.data:
            raise UsageError("--data is required (a labelled folder or s3:// prefix with happy/ and sad/, or .tar shards)")
        if not self.output:
            raise UsageError("--output is required (a folder for evaluation.json, predictions.parquet, report.html)")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise UsageError(f"--threshold {self.threshold} must be within [0, 1]")
        for flag, value in (("--batch-size", self.batch_size), ("--max-file-mb", self.max_file_mb)):
            if value < 1:
                raise UsageError(f"{flag} {value} must be >= 1")
        if self.concurrency < 0:
            raise UsageError(f"--concurrency {self.concurrency} must be >= 0")

    def scoring(self) -> score.ScoreConfig:
        """The same replica settings `score` would use."""
        return score.ScoreConfig(
            inputs=self.data, output=self.output, model=self.model, batch_size=self.batch_size,
            concurrency=self.concurrency, gpu=self.gpu, threshold=self.threshold, max_file_mb=self.max_file_mb,
        )


# --- scoring on Ray ------------------------------------------------------------------------------


def _as_score_rows(batch: pa.Table) -> pa.Table:
    """Labelled rows as score's read stage expects them (already read: no source), label kept as true_label."""
    n = batch.num_rows
    return pa.table(
        {
            "path": batch["path"], "bytes": batch["bytes"], "error": batch["error"].cast(pa.string()),
            "source": pa.array([b""] * n, pa.binary()), "size": pa.array([0] * n, pa.int64()),
            "offset": pa.array([inputs.WHOLE] * n, pa.int64()),
            "true_label": batch["label"].cast(pa.string()),
        }
    )


def _decode_labelled(batch: dict, max_bytes: int) -> dict:
    """score's decode stage (--gpu), keeping each row's true_label."""
    return score.decode_batch(batch, max_bytes) | {"true_label": batch["true_label"]}


class LabelledReplica(score.Replica):
    """score's replica (same model load, batching and schema), keeping each row's true_label."""

    def __call__(self, batch: dict) -> pa.Table:
        labels = pa.array(list(batch["true_label"]), pa.string())
        return super().__call__(batch).append_column("true_label", labels)


def predict(labelled, model: score.Model, config: score.ScoreConfig) -> pa.Table:
    """score's columns plus true_label for every labelled row, scored by score's replicas; sorted by path."""
    ds = labelled.map_batches(_as_score_rows, batch_format="pyarrow")
    env = console.task_runtime_env()
    if config.gpu:  # as score: decode on every CPU, replicas only predict
        ds = ds.map_batches(
            _decode_labelled, fn_kwargs={"max_bytes": config.max_bytes}, batch_size=config.batch_size, num_cpus=1, runtime_env=env
        )
    scored = ds.map_batches(
        LabelledReplica,
        fn_constructor_kwargs={"model": model, "batch_size": config.batch_size, "max_bytes": config.max_bytes},
        batch_size=config.batch_size,
        compute=score._replica_pool(config),
        num_gpus=1 if config.gpu else 0,
        num_cpus=0 if config.gpu else 1,
        runtime_env=env,
    )
    import ray

    tables = [t.select(LABELLED_ROWS.names).cast(LABELLED_ROWS) for t in ray.get(scored.to_arrow_refs()) if t.num_rows]
    table = pa.concat_tables(tables) if tables else LABELLED_ROWS.empty_table()
    return table.sort_by("path")


def run(config: EvaluateConfig) -> dict:
    """Score the labelled set, write evaluation.json, predictions.parquet and report.html; return the evaluation."""
    model = score.open_model(config.model, config.threshold)  # a bad model fails here, before anything runs
    if storage.file_type(config.output) == pafs.FileType.File:
        raise UsageError(f"--output {config.output}: is a file; give a folder")
    if storage.file_type(storage.join(config.output, "evaluation.json")) != pafs.FileType.NotFound:  # as train: never over
        raise UsageError(f"--output {config.output}: already holds an evaluation; give a new folder")
    listing = sources.list_labelled(list(config.data))  # a typo is answered here, before Ray starts
    console.join_ray()  # read tasks and replicas reach the same S3 endpoint as this process
    gpus.refuse_unless_one_can_come(config.gpu)
    labelled = sources.labelled_images(listing, max_file_mb=config.max_file_mb)
    listing_skipped = dict(listing.skipped)
    table = predict(labelled, model, config.scoring())
    storage.write_parquet(storage.join(config.output, "predictions.parquet"), table)
    result = evaluation(table, model.threshold, listing_skipped)
    result |= {"model": model.id, "model_uri": model.uri, "data": list(config.data), "versions": report.versions()}
    storage.write_bytes(storage.join(config.output, "evaluation.json"), json.dumps(result, indent=2).encode())
    counts = {"evaluated": result["counts"]}
    html = report.page_for(
        f"Evaluation of {model.uri} on {', '.join(config.data)}", table, result, lambda: labelled, model,
        counts=counts, skipped=result["skipped"], info={"data": list(config.data), "model": model.uri, "versions": result["versions"]},
    )
    storage.write_bytes(storage.join(config.output, "report.html"), html)
    print(_summary_line(result, config.output), flush=True)
    return result


def _summary_line(result: dict, output: str) -> str:
    figures = "  ".join(f"{name} {shown(result, name)}" for name in ("accuracy", "f1", "auc", "loss"))
    skipped = sum(result["skipped"].values())
    return f"evaluated {result['n']} images at threshold {result['threshold']:.3f}: {figures}  skipped {skipped}; output: {output}"


