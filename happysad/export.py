"""Export the model for serving: a TensorFlow SavedModel (TF Serving) or a TFLite file (mobile).

    happysad export --model runs/RUN --format savedmodel --out serving/happysad/1
    happysad export --model runs/RUN --format tflite --out happysad.tflite

Both take the raw RGB pixels the Keras model takes (the [0, 1] scaling is a
layer inside it) and give P(sad), the Keras model's own output:

    serving_default   images float32 [N, 256, 256, 3], RGB 0..255  ->  p_sad float32 [N]
    serving_uint8     images uint8   [N, 256, 256, 3], RGB         ->  p_sad float32 [N]   (SavedModel only)

The TFLite file holds serving_default, unquantised, so it agrees with Keras to
float rounding. TensorFlow only: the SavedModel is traced from the Keras model.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from happysad import storage
from happysad.model import IMAGE_SIZE
from happysad.storage import UsageError

FORMATS = ("savedmodel", "tflite")


@dataclass(frozen=True)
class ExportConfig:
    model: str = ""  # a .keras file or a run directory; empty = the newest run under runs/
    format: str = "savedmodel"  # one of FORMATS
    out: str = ""  # SavedModel folder, or .tflite file; local or s3://

    def __post_init__(self):
        if self.format not in FORMATS:
            raise UsageError(f"--format {self.format}: must be one of {', '.join(FORMATS)}")
        if not self.out:
            raise UsageError("--out is required (a folder for a SavedModel, a file for TFLite)")


def export_archive(keras_model):
    """The serving signatures over the model's own variables, ready to write out."""
    import keras
    import tensorflow as tf

    def p_sad(images):
        return {"p_sad": keras_model(tf.cast(images, tf.float32), training=False)[:, 0]}

    archive = keras.export.ExportArchive()
    archive.track(keras_model)
    for name, dtype in (("serving_default", tf.float32), ("serving_uint8", tf.uint8)):
        spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], dtype, name="images")
        archive.add_endpoint(name, p_sad, input_signature=[spec])
    return archive


def write_saved_model(keras_model, folder: str) -> None:
    """Write the SavedModel to `folder`. TensorFlow's own "Assets written to: FOLDER" line is kept back: the
    folder is where the export is built, not where it ends up (`run` prints that)."""
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        export_archive(keras_model).write_out(folder, verbose=False)
    finally:
        logger.setLevel(level)


def tflite_bytes(saved_model: str) -> bytes:
    """serving_default as a float32 TFLite flatbuffer (no quantisation: outputs match Keras)."""
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=["serving_default"]).convert()


def _check_out(config: ExportConfig) -> None:
    """A SavedModel folder is never written over: TF Serving may be reading it (write a new version folder)."""
    kind = storage.file_type(config.out)
    if config.format == "savedmodel" and kind != pafs.FileType.NotFound:
        raise UsageError(f"--out {config.out}: already exists; give a new folder (TF Serving versions: model/1, model/2)")
    if config.format == "tflite" and kind == pafs.FileType.Directory:
        raise UsageError(f"--out {config.out}: is a folder; give a file name such as happysad.tflite")
    if config.format == "tflite" and kind == pafs.FileType.File:  # as train, evaluate and SavedModel: never written over
        raise UsageError(f"--out {config.out}: already exists; give a new file name")


def _publish_folder(local: Path, out: str) -> None:
    """Move a finished local folder to --out: one rename locally (atomic), file by file to S3."""
    if storage.is_s3(out):
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            storage.write_bytes(storage.join(out, path.relative_to(local).as_posix()), path.read_bytes())
        return
    target = Path(out).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(local, target)  # the temporary folder is made beside the target: same filesystem


def _check_backend() -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise UsageError(f"export needs the TensorFlow Keras backend (KERAS_BACKEND is {keras.backend.backend()!r})")


def _staging_parent(out: str) -> str | None:
    """Where to build the SavedModel: beside a local --out (so the final rename stays on one filesystem)."""
    if storage.is_s3(out):
        return None
    parent = Path(out).expanduser().resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent)


def run(config: ExportConfig) -> str:
    """Write the SavedModel or TFLite file to --out; print and return where."""
    from happysad.score import load_keras_model, open_model

    model = open_model(config.model)
    _check_out(config)
    _check_backend()
    keras_model = load_keras_model(model.uri)
    staging = tempfile.mkdtemp(prefix=".happysad-export-", dir=_staging_parent(config.out))
    try:
        saved_model = os.path.join(staging, "savedmodel")
        write_saved_model(keras_model, saved_model)
        if config.format == "tflite":
            storage.write_bytes(config.out, tflite_bytes(saved_model))
        else:
            _publish_folder(Path(saved_model), config.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {config.format} of model {model.id} to {config.out}", file=sys.stdout, flush=True)
    return config.out
