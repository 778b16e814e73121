"""The seed CNN: build, compile, save, load. Pixels 0..255 in, P(sad) out."""

from __future__ import annotations

import hashlib

import keras

IMAGE_SIZE = 256


def build_model() -> keras.Model:
    """The seed architecture, with the [0, 1] scaling inside so serving takes raw RGB pixels."""
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


def load_model(path: str) -> keras.Model:
    """Load a saved model for inference; never runs untrusted lambdas (safe_mode)."""
    return keras.models.load_model(path, compile=False, safe_mode=True)


def file_digest(data: bytes) -> str:
    """The model id written with every score: first 16 hex digits of the file's sha256."""
    return hashlib.sha256(data).hexdigest()[:16]
