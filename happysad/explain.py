"""Grad-CAM heat maps: which part of a face the CNN's score came from.

    happysad explain --model runs/RUN face1.jpg face2.png --out heatmaps/

For each image, one PNG in --out: the decoded 256x256 image beside the same
image under the Grad-CAM heat map of the last convolution layer, with the
label, P(sad) and the threshold written below. The heat map explains the
label shown (at the model's threshold): for `sad` the evidence for sad, for
`happy` the evidence against it. One process, TensorFlow only (GradientTape).
"""

from __future__ import annotations

import os
import posixpath
import sys
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow.fs as pafs

from happysad import storage
from happysad.decode import DecodeError, decode_image
from happysad.model import IMAGE_SIZE
from happysad.storage import UsageError

HEAT_WEIGHT = 0.6  # opacity of the heat colours where the heat is 1; where it is 0 the image shows unchanged
BAND = 34  # pixels of text band below the two panels
MAX_FILE_MB = 64  # a larger image file is refused unread (score's --max-file-mb default)


@dataclass(frozen=True)
class ExplainConfig:
    images: tuple[str, ...] = ()  # image files, local or s3://
    out: str = ""  # folder (local or s3://) for one PNG per image
    model: str = ""  # a .keras file or a run directory; empty = the newest run under runs/
    threshold: float | None = None  # None = the model's (model.json), else 0.5

    def __post_init__(self):
        if not self.images:
            raise UsageError("IMAGE: give at least one image file")
        if not self.out:
            raise UsageError("--out is required (a folder for the PNGs)")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise UsageError(f"--threshold {self.threshold} must be within [0, 1]")


def _map_layer(keras_model) -> int:
    """Index of the layer whose output is the map: the last Conv2D, or the max pooling right after it.

    With max pooling only each window's maximum gets a gradient, so an element-wise map at
    the convolution's own resolution is a scatter of single pixels; after the pooling, each
    window's contribution is one value (the sum of the convolution's over the window).
    """
    import keras

    convs = [i for i, layer in enumerate(keras_model.layers) if isinstance(layer, keras.layers.Conv2D)]
    if not convs:
        raise UsageError("--model: the model has no convolution layer to explain")
    after = convs[-1] + 1
    pooled = after < len(keras_model.layers) and isinstance(keras_model.layers[after], keras.layers.MaxPooling2D)
    return after if pooled else convs[-1]


def cam_model(keras_model):
    """A functional view of the seed Sequential: pixels -> (map layer output, penultimate output, P(sad)).

    The layers are called in order on a new Input, so the view shares the model's weights.
    """
    import keras

    index = _map_layer(keras_model)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = penultimate = feature_map = inputs
    for i, layer in enumerate(keras_model.layers):
        penultimate, x = x, layer(x)
        if i == index:
            feature_map = x
    return keras.Model(inputs, [feature_map, penultimate, x])


def map_geometry(keras_model) -> tuple[float, float]:
    """(stride, offset): map pixel i is centred on image pixel stride * i + offset.

    Each unpadded k-wide window moves the centre (k - 1) / 2 input steps in, and strides
    multiply the step: for the seed CNN the pooled last convolution gives (8, 10.5).
    """
    import keras

    stride, offset = 1.0, 0.0
    for layer in keras_model.layers[: _map_layer(keras_model) + 1]:
        if isinstance(layer, keras.layers.Conv2D):
            window, step, padding = (layer.kernel_size[0] - 1) * layer.dilation_rate[0] + 1, layer.strides[0], layer.padding
        elif isinstance(layer, keras.layers.MaxPooling2D):
            window, step, padding = layer.pool_size[0], layer.strides[0], layer.padding
        else:
            continue
        if padding == "valid":
            offset += (window - 1) / 2 * stride
        stride *= step
    return stride, offset


def grad_cam(keras_model, image_uint8: np.ndarray, threshold: float = 0.5, view=None) -> tuple[np.ndarray, float]:
    """(heat map float32 256x256 in [0, 1], P(sad)) for one (256, 256, 3) uint8 RGB image.

    Grad-CAM on the last convolution layer (as its max pooling passes it on, see
    _map_layer), for the label the score gives at `threshold`, in its element-wise form
    (HiResCAM): each channel's activation is weighted by its gradient at the same place,
    not by the gradient's mean over the map. The seed's Flatten + Dense head is
    position-specific, so averaged gradients cancel and light up background (measured,
    six models trained 3 epochs, 24 synthetic faces each: the face disc held more mean
    heat than the rest in 14-23 of the 24 with averaging, in all 24 element-wise).
    The map is the ReLU of the weighted channels, scaled so its maximum is 1 (all zeros
    if nothing supports the label). The gradient is the logit's, negated for `happy`:
    a saturated sigmoid (P = 1.0) has a zero gradient. Pass `view` (from cam_model)
    to reuse it across many images.
    """
    import tensorflow as tf

    view = cam_model(keras_model) if view is None else view
    last = keras_model.layers[-1]
    pixels = tf.convert_to_tensor(image_uint8[None], tf.float32)
    with tf.GradientTape() as tape:
        feature_map, penultimate, prob = view(pixels, training=False)
        # The last Dense layer without its sigmoid: the seed architecture ends in Dense(1, sigmoid).
        kernel, bias = tf.cast(last.kernel, tf.float32), tf.cast(last.bias, tf.float32)
        logit = tf.matmul(tf.cast(penultimate, tf.float32), kernel) + bias
    score = float(prob[0, 0])
    sign = 1.0 if score >= threshold else -1.0  # evidence for the label shown, sad or happy
    grads = sign * tape.gradient(logit, feature_map)
    cam = tf.nn.relu(tf.reduce_sum(grads * tf.cast(feature_map, tf.float32), axis=-1))[0].numpy()
    return to_image_grid(cam, *map_geometry(keras_model)), score


def to_image_grid(cam: np.ndarray, stride: float, offset: float) -> np.ndarray:
    """The map resized onto the 256x256 image, each value over the pixels that made it, scaled to [0, 1]."""
    matrix = np.float32([[stride, 0, offset], [0, stride, offset]])
    size = (IMAGE_SIZE, IMAGE_SIZE)
    heat = cv2.warpAffine(cam.astype(np.float32), matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    heat = np.maximum(heat, 0)
    peak = float(heat.max())
    return (heat / peak if peak > 0 else heat).astype(np.float32)


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray, caption: str) -> np.ndarray:
    """The picture a person reads, BGR for OpenCV: image | image under the heat map, caption below."""
    bgr = cv2.cvtColor(image_uint8, cv2.COLOR_RGB2BGR)
    colours = cv2.applyColorMap(np.uint8(np.round(heatmap * 255)), cv2.COLORMAP_JET)
    alpha = (HEAT_WEIGHT * heatmap)[..., None]  # cold places stay untinted: the face reads through
    blended = np.uint8(np.round(alpha * colours + (1 - alpha) * bgr))
    canvas = np.zeros((IMAGE_SIZE + BAND, 2 * IMAGE_SIZE, 3), np.uint8)
    canvas[:IMAGE_SIZE, :IMAGE_SIZE] = bgr
    canvas[:IMAGE_SIZE, IMAGE_SIZE:] = blended
    cv2.putText(canvas, caption, (8, IMAGE_SIZE + 23), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def read_image(uri: str) -> np.ndarray:
    """The decoded image, or a UsageError naming the file and why it is unusable."""
    fs, path = storage.filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise UsageError(f"IMAGE {uri}: {'no such file' if info.type == pafs.FileType.NotFound else 'not a file'}")
        if info.size > MAX_FILE_MB << 20:  # refused unread, as score does: one image is never worth gigabytes
            raise UsageError(f"IMAGE {uri}: not usable (too_large: over {MAX_FILE_MB} MB)")
        return decode_image(storage.read_bytes(uri))
    except DecodeError as exc:
        raise UsageError(f"IMAGE {uri}: not usable ({exc})") from None
    except OSError as exc:
        raise UsageError(f"IMAGE {uri}: cannot read ({' '.join(str(exc).split())})") from None


def output_names(images: tuple[str, ...]) -> list[str]:
    """One PNG name per image, from its file name; repeated names get -2, -3... in input order."""
    used, names = set(), []
    for uri in images:
        stem = os.path.splitext(posixpath.basename(uri.rstrip("/")) or "image")[0] or "image"
        name, k = f"{stem}.png", 1
        while name in used:
            k += 1
            name = f"{stem}-{k}.png"
        used.add(name)
        names.append(name)
    return names


def _check_backend() -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise UsageError(f"explain needs the TensorFlow Keras backend (KERAS_BACKEND is {keras.backend.backend()!r})")


def run(config: ExplainConfig) -> list[str]:
    """Write one heat-map PNG per image into --out; print path, label, score, PNG; return the PNG URIs."""
    from happysad.score import decided_labels, load_keras_model, open_model

    model = open_model(config.model, config.threshold)
    if storage.file_type(config.out) == pafs.FileType.File:
        raise UsageError(f"--out {config.out}: is a file; give a folder for the PNGs")
    for uri in config.images:  # every image is checked before the model loads or anything is written
        read_image(uri)
    _check_backend()
    keras_model = load_keras_model(model.uri)
    view = cam_model(keras_model)
    written = []
    for uri, name in zip(config.images, output_names(config.images)):
        image = read_image(uri)  # decoded again, not kept: memory stays one image however many are given
        heatmap, score = grad_cam(keras_model, image, model.threshold, view)
        label = str(decided_labels(score, model.threshold))
        caption = f"{label}   P(sad) {score:.3f}   threshold {model.threshold:.2f}"
        ok, png = cv2.imencode(".png", overlay(image, heatmap, caption))
        assert ok
        target = storage.join(config.out, name)
        storage.write_bytes(target, png.tobytes())
        written.append(target)
        print(f"{uri}\t{label}\t{score:.6f}\t{target}", file=sys.stdout, flush=True)
    return written
