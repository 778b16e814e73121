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
import os
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from happysad import console, gpus, inputs, score, sources, storage
from happysad.metrics import binary_metrics, curves, log_losses
from happysad.storage import UsageError

WORST = 16  # thumbnails of the highest-loss rows in the report
LABELLED_ROWS = score.SCHEMA.append(pa.field("true_label", pa.string()))  # predictions and test_predictions.parquet


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


def labelled_rows(table: pa.Table) -> pa.Table:
    """Rows that count toward the metrics: scored (no error) and labelled happy or sad."""
    keep = pc.and_(pc.is_valid(table["score"]), pc.is_in(table["true_label"], pa.array(sources.CLASSES)))
    return table.filter(pc.fill_null(keep, False))


def skipped_reasons(table: pa.Table, listing_skipped: dict) -> dict:
    """Inputs that count toward no metric, by reason: listing skips, read/decode errors, no label."""
    skipped = Counter(listing_skipped)
    skipped.update(e for e in table["error"].to_pylist() if e)
    labelled = pc.fill_null(pc.is_in(table["true_label"], pa.array(sources.CLASSES)), False)
    unlabelled = pc.and_(pc.is_null(table["error"]), pc.invert(labelled))
    skipped["no_label"] += pc.sum(pc.cast(unlabelled, pa.int64())).as_py() or 0
    return {k: v for k, v in sorted(skipped.items()) if v}


def evaluation(table: pa.Table, threshold: float, listing_skipped: dict) -> dict:
    """evaluation.json's content from the predictions table."""
    rows = labelled_rows(table)
    sad = np.array(rows["true_label"].to_pylist()) == "sad"
    result = binary_metrics(rows["score"].to_numpy(), sad, threshold)
    counts = {c: int(np.sum(sad == (c == "sad"))) for c in sources.CLASSES}
    return result | {"counts": counts, "skipped": skipped_reasons(table, listing_skipped)}


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


def _worker_env() -> dict | None:
    # Workers inherit the raylet's environment, not ours: pass on the Keras backend and the S3 endpoint.
    env = {k: os.environ[k] for k in ("KERAS_BACKEND",) if k in os.environ} | storage.ray_env_vars()
    return {"env_vars": env} if env else None


def predict(labelled, model: score.Model, config: score.ScoreConfig) -> pa.Table:
    """score's columns plus true_label for every labelled row, scored by score's replicas; sorted by path."""
    ds = labelled.map_batches(_as_score_rows, batch_format="pyarrow")
    env = _worker_env()
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


def fetch_images(open_labelled, paths: list[str]) -> dict[str, bytes]:
    """The bytes of a few rows, read again (predictions keep no bytes).

    A file is read directly; a shard member (`SHARD#MEMBER`), or a name that cannot be
    opened as written, is found by one more pass over the labelled dataset, which
    `open_labelled()` makes only then (listing a large set is not free).
    """
    found = {}
    for path in paths:
        if "#" not in path:
            try:
                found[path] = storage.read_bytes(path)
            except OSError:
                continue
    missing = [p for p in paths if p not in found]
    return found | (_scan_for(open_labelled(), missing) if missing else {})


def _scan_for(labelled, paths: list[str]) -> dict[str, bytes]:
    wanted = set(paths)  # a few paths: small enough to travel with each task

    def keep(batch: pa.Table, wanted) -> pa.Table:
        mask = pa.array([p in wanted for p in batch["path"].to_pylist()], pa.bool_())
        return batch.select(["path", "bytes"]).filter(mask)

    found = labelled.map_batches(keep, fn_kwargs={"wanted": wanted}, batch_format="pyarrow")
    return {row["path"]: row["bytes"] for row in found.take_all()}


# --- the report page -------------------------------------------------------------------------------


def thumbnails(open_labelled, worst: list[dict], model: score.Model) -> list[dict]:
    """Each worst row with a PNG: the face beside its Grad-CAM heat map (for the label the model gave)."""
    import cv2

    from happysad import explain
    from happysad.decode import decode_image

    if not worst:
        return []
    images = fetch_images(open_labelled, [r["path"] for r in worst])
    keras_model = score.load_keras_model(model.uri)
    view = explain.cam_model(keras_model)
    out = []
    for row in worst:
        image = decode_image(images[row["path"]])
        heat, _ = explain.grad_cam(keras_model, image, model.threshold, view)
        picture = explain.overlay(image, heat, "")[: image.shape[0]]  # the caption goes in the page, not the pixels
        small = cv2.resize(picture, (picture.shape[1] // 2, picture.shape[0] // 2), interpolation=cv2.INTER_AREA)
        ok, png = cv2.imencode(".png", small)
        assert ok
        out.append(row | {"png": png.tobytes()})
    return out


def versions() -> dict:
    from importlib import metadata

    found = {"python": sys.version.split()[0]}
    for name in ("happysad", "ray", "keras", "tensorflow", "numpy", "opencv-python-headless", "pyarrow"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def page_for(title: str, table: pa.Table, result: dict, open_labelled, model: score.Model, **extra) -> bytes:
    """report.html for scored rows: metrics, curves, the worst rows with heat maps, and `extra` sections."""
    from happysad import page

    rows = labelled_rows(table)
    sad = np.array(rows["true_label"].to_pylist()) == "sad"
    worst = thumbnails(open_labelled, worst_rows(table), model)
    return page.render(
        title=title, metrics=result, curves=curves(rows["score"].to_numpy(), sad, model.threshold),
        worst=worst, **extra,
    )


def run(config: EvaluateConfig) -> dict:
    """Score the labelled set, write evaluation.json, predictions.parquet and report.html; return the evaluation."""
    model = score.open_model(config.model, config.threshold)  # a bad model fails here, before anything runs
    if storage.file_type(config.output) == pafs.FileType.File:
        raise UsageError(f"--output {config.output}: is a file; give a folder")
    console.join_ray()  # read tasks and replicas reach the same S3 endpoint as this process
    gpus.refuse_unless_one_can_come(config.gpu)
    labelled, listing_skipped = sources.labelled_images(list(config.data), flag="--data", max_file_mb=config.max_file_mb)
    table = predict(labelled, model, config.scoring())
    storage.write_parquet(storage.join(config.output, "predictions.parquet"), table)
    result = evaluation(table, model.threshold, listing_skipped)
    result |= {"model": model.id, "model_uri": model.uri, "data": list(config.data), "versions": versions()}
    storage.write_bytes(storage.join(config.output, "evaluation.json"), json.dumps(result, indent=2).encode())
    counts = {"evaluated": result["counts"]}
    html = page_for(
        f"Evaluation of {model.id}", table, result, lambda: labelled, model,
        counts=counts, skipped=result["skipped"], info={"data": list(config.data), "model": model.uri, "versions": result["versions"]},
    )
    storage.write_bytes(storage.join(config.output, "report.html"), html)
    print(_summary_line(result, config.output), flush=True)
    return result


def _summary_line(result: dict, output: str) -> str:
    names = ("accuracy", "f1", "auc", "loss")
    shown = {k: f"{result[k]:.4f}" if result[k] is not None else f"n/a ({result['undefined'][k]})" for k in names}
    skipped = sum(result["skipped"].values())
    return f"evaluated {result['n']} images at threshold {result['threshold']:.3f}: " + "  ".join(
        f"{k} {v}" for k, v in shown.items()
    ) + f"  skipped {skipped}; output: {output}"


# --- a training run's page ---------------------------------------------------------------------


def write_predictions(output: str, predictions: dict[str, pa.Table], model: score.Model) -> dict[str, pa.Table]:
    """Each split's worker rows (report.WORKER_PREDICTIONS) as `predict` gives them, labelled at the model's
    threshold, sorted by path: written to report.PREDICTIONS[split] in the run directory, then the workers'
    own files are removed. Returns the written tables."""
    from happysad import report

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
        storage.write_parquet(storage.join(output, report.PREDICTIONS[split]), table)
        written[split] = table
    for split in predictions:  # last: until the merged files are written, the workers' files are the only copy
        fs, parts = storage.filesystem(storage.join(output, report.WORKER_PREDICTIONS_DIRS[split]))
        if fs.get_file_info(parts).type == pafs.FileType.Directory:
            fs.delete_dir(parts)
    return written


def run_page(output: str, table: pa.Table, model: score.Model, metrics: dict, history: list[dict]) -> bytes:
    """report.html of a training run: its test split as the trained model scored it, plus the run's history."""
    from happysad import synth

    config = metrics["config"]
    uris = list(config["data"]) or [str(synth.demo_data())]
    result = evaluation(table, model.threshold, {})
    info = {"data": uris, "config": config, "versions": versions(), "threshold": metrics.get("threshold"), "val": metrics.get("val")}
    threshold = metrics.get("threshold") or {}
    why = f" (validation could not choose one: {threshold['reason']}; 0.5 is the default)" if threshold.get("reason") else ""
    subtitle = (
        f"Run {output}: {metrics.get('epochs', len(history))} epochs. Below, the test split ({result['n']} images) "
        f"as the trained model scored it, at its threshold {model.threshold:.3f}{why}."
    )
    return page_for(
        "Training run report", table, result, lambda: sources.labelled_images(uris)[0], model,
        counts=metrics["counts"], skipped=metrics["skipped"], info=info, history=history, subtitle=subtitle,
    )
