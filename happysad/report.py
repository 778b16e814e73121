"""What a report.html shows, gathered: the metrics and curves of labelled predictions, the worst rows
with their faces beside Grad-CAM heat maps, the run's facts. `render` turns it into HTML.

Images are read again only for the few rows shown (predictions keep no bytes).
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa

from happysad import predictions, render, score, sources, storage, synth
from happysad.metrics import curves


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
    rows = predictions.labelled_rows(table)
    sad = np.array(rows["true_label"].to_pylist()) == "sad"
    worst = thumbnails(open_labelled, predictions.worst_rows(table), model)
    return render.render(
        title=title, metrics=result, curves=curves(rows["score"].to_numpy(), sad, model.threshold),
        worst=worst, **extra,
    )


def training_page(output: str, table: pa.Table, model: score.Model, metrics: dict, history: list[dict]) -> bytes:
    """report.html of a training run: its test split as the trained model scored it, plus the run's history."""
    config = metrics["config"]
    uris = list(config["data"]) or [str(synth.demo_data())]
    result = predictions.evaluation(table, model.threshold, {})
    info = {"data": uris, "config": config, "versions": versions(), "threshold": metrics.get("threshold"), "val": metrics.get("val")}
    threshold = metrics.get("threshold") or {}
    why = f" (validation could not choose one: {threshold['reason']}; 0.5 is the default)" if threshold.get("reason") else ""
    subtitle = (
        f"Run {output}: {metrics.get('epochs', len(history))} epochs. Below, the test split ({result['n']} images) "
        f"as the trained model scored it, at its threshold {model.threshold:.3f}{why}."
    )
    return page_for(
        "Training run report", table, result, lambda: sources.labelled_images(sources.list_labelled(uris)), model,
        counts=metrics["counts"], skipped=metrics["skipped"], info=info, history=history, subtitle=subtitle,
    )
