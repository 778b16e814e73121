"""The seed CNN: build, check, save, load. Pixels 0..255 in, P(sad) out.

Keras is imported inside the functions that need it, so a driver can check a
model file (and compute its id) without starting TensorFlow.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

from happysad.storage import UsageError

IMAGE_SIZE = 256
CLASSES = ("happy", "sad")  # label 0, label 1 (alphabetical, as the seed's image_dataset_from_directory): the sigmoid is P(sad)
# The layers of the seed architecture: a .keras file holding anything else is refused unloaded.
SEED_LAYERS = {"InputLayer", "Rescaling", "Conv2D", "MaxPooling2D", "Flatten", "Dense"}


def build_model():
    """The seed architecture, with the [0, 1] scaling inside so serving takes raw RGB pixels."""
    import keras

    return keras.Sequential(
        [
            keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)),
            keras.layers.Rescaling(1.0 / 255),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(256, activation="relu"),
            # float32 even under a mixed-precision policy: a sigmoid in float16 saturates.
            keras.layers.Dense(1, activation="sigmoid", dtype="float32"),
        ],
        name="happysad",
    )


def check_model_file(data: bytes, flag_value: str) -> None:
    """Refuse, as a UsageError naming the --model value, a file that is not a seed-architecture .keras model.

    Reads only the zip's config.json: no Keras, nothing executed. A Lambda or any
    layer outside the seed architecture is refused before any process loads it.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            config = json.loads(archive.read("config.json"))
            if "model.weights.h5" not in archive.namelist():
                raise KeyError("model.weights.h5")
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError) as exc:
        raise UsageError(f"--model {flag_value}: not a readable .keras model file ({type(exc).__name__})") from None
    layers = config.get("config", {}).get("layers", []) if isinstance(config, dict) else []
    if not isinstance(config, dict) or config.get("class_name") != "Sequential" or not layers:
        raise UsageError(f"--model {flag_value}: not the happysad CNN (expected a Sequential model)")
    for layer in layers:
        name = layer.get("class_name") if isinstance(layer, dict) else None
        if name not in SEED_LAYERS or layer.get("module") != "keras.layers":
            raise UsageError(f"--model {flag_value}: layer {name!r} is not part of the happysad CNN; refusing to load it")


def load_model(path: str):
    """Load a saved model for inference; never runs untrusted lambdas (safe_mode)."""
    import keras

    return keras.models.load_model(path, compile=False, safe_mode=True)


def file_digest(data: bytes) -> str:
    """The model id written with every score: first 16 hex digits of the file's sha256."""
    return hashlib.sha256(data).hexdigest()[:16]
