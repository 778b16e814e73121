"""The synthetic happy/sad face set: the embedded demo data and the tests' data.

Faces are drawn with OpenCV: varied size, skin tone, background and image
size (200-800 px), mostly JPEG with some PNG. Each image depends only on
(seed, index), so any subset is reproducible. Faces stay near the centre
with bold mouths: the seed CNN's Flatten + Dense head is position-specific,
and faces placed anywhere keep it at chance for epochs (FIELD_NOTES).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from happysad.model import CLASSES

DEMO_SIZE = 600  # demo images: >= 95% test accuracy in 10 epochs, under 5 minutes on 2 CPU cores
PNG_SHARE = 0.15
SKIN_TONES = [(198, 226, 255), (160, 200, 240), (120, 170, 225), (90, 135, 190), (60, 95, 140), (45, 70, 105)]  # BGR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    key: str
    label: str
    extension: str
    data: bytes


BACKGROUNDS = ("any", "dark", "light")  # make-data --background: a shifted set for drift (same faces, other backgrounds)


def draw_face(rng: np.random.Generator, label: str, side: int, background: str = "any") -> np.ndarray:
    """One BGR face, centred within ~5% of the frame, smiling (happy) or frowning (sad).

    `background` "dark" or "light" squeezes the background's colour into 0-35 or 220-255; the
    random draws are the same, so the faces are those of "any" on other backgrounds.
    """
    background = _background(rng.integers(30, 226, 3), background)
    image = np.empty((side, side, 3), np.uint8)
    image[:] = background
    image = cv2.add(image, rng.integers(-8, 9, image.shape).astype(np.int8), dtype=cv2.CV_8U)
    cx, cy = (side / 2 + rng.uniform(-0.05, 0.05, 2) * side).astype(int)
    radius = int(side * rng.uniform(0.31, 0.38))
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))]
    cv2.circle(image, (cx, cy), radius, skin, -1, cv2.LINE_AA)
    eye_dx, eye_y, eye_r = int(radius * 0.38), cy - int(radius * 0.3), max(2, int(radius * 0.1))
    for ex in (cx - eye_dx, cx + eye_dx):
        cv2.circle(image, (ex, eye_y), eye_r, (30, 30, 30), -1, cv2.LINE_AA)
    mouth_w, mouth_h = int(radius * rng.uniform(0.5, 0.65)), int(radius * rng.uniform(0.28, 0.38))
    thickness = max(4, int(radius * 0.16))
    colour = (40, 40, int(rng.integers(60, 200)))
    if label == "happy":  # lower half of an ellipse: a smile
        cv2.ellipse(image, (cx, cy + int(radius * 0.2)), (mouth_w, mouth_h), 0, 10, 170, colour, thickness, cv2.LINE_AA)
    else:  # upper half, lower on the face: a frown
        cv2.ellipse(image, (cx, cy + int(radius * 0.6)), (mouth_w, mouth_h), 0, 190, 350, colour, thickness, cv2.LINE_AA)
    return image


def _background(colour: np.ndarray, kind: str) -> np.ndarray:
    if kind == "dark":
        return (colour - 30) * 35 // 195
    if kind == "light":
        return 220 + (colour - 30) * 35 // 195
    if kind != "any":
        raise ValueError(f"background {kind!r}: expected one of {BACKGROUNDS}")
    return colour


def sample(seed: int, index: int, background: str = "any") -> Sample:
    """The index-th image of the set drawn with this seed; classes alternate."""
    rng = np.random.default_rng([seed, index])
    label = CLASSES[index % 2]
    side = int(rng.integers(200, 801))
    image = draw_face(rng, label, side, background)
    extension = "png" if rng.random() < PNG_SHARE else "jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))] if extension == "jpg" else []
    ok, encoded = cv2.imencode("." + extension, image, params)
    assert ok
    return Sample(f"{label}_{seed}_{index:06d}", label, extension, encoded.tobytes())


def write_folders(out: Path, n: int, seed: int = 0, background: str = "any") -> None:
    """Class folders: out/happy/*.jpg|png, out/sad/*.jpg|png."""
    for label in CLASSES:
        (out / label).mkdir(parents=True, exist_ok=True)
    for index in range(n):
        s = sample(seed, index, background)
        (out / s.label / f"{s.key}.{s.extension}").write_bytes(s.data)


def write_shards(out: Path, n: int, seed: int = 0, shards: int = 1, background: str = "any") -> None:
    """WebDataset shards out/shard-00000.tar ...: members KEY.jpg|png and KEY.cls."""
    out.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with tarfile.open(out / f"shard-{shard:05d}.tar", "w") as tar:
            for index in range(shard, n, shards):
                s = sample(seed, index, background)
                for name, payload in ((f"{s.key}.{s.extension}", s.data), (f"{s.key}.cls", s.label.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def make_data(out: str | Path, n: int, seed: int = 0, shards: int = 0, background: str = "any") -> Path:
    """Write n images as class folders (shards=0) or as `shards` WebDataset tar files; `background`: see draw_face."""
    out = Path(out)
    if shards:
        write_shards(out, n, seed, shards, background)
    else:
        write_folders(out, n, seed, background)
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "happysad"


def demo_data(n: int = DEMO_SIZE, seed: int = 0) -> Path:
    """The demo set as class folders, generated once into the cache and reused."""
    target = cache_dir() / f"demo-v3-n{n}-seed{seed}"
    if target.is_dir():
        return target
    log.info("generating %d demo images into %s (once)", n, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        write_folders(staging, n, seed)
        staging.rename(target)  # atomic: a half-written demo set is never reused
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


def photo(seed: int = 0, width: int = 4000, height: int = 3000, grain: float = 3.0) -> np.ndarray:
    """A natural-ish BGR photo (12 MP by default): a drawn face scaled up, smooth colour gradients and blotches, grain.

    For decode tests and benchmarks of large JPEGs. Not pure noise: no downscaler
    handles that comparably, and photos are not noise. More grain, larger JPEG files.
    """
    rng = np.random.default_rng(seed)
    face = cv2.resize(draw_face(rng, "happy", 1000), (width, height), interpolation=cv2.INTER_CUBIC)
    ramps = np.linspace(0, 1, 64, dtype=np.float32)
    low = rng.uniform(-40, 40, 3).astype(np.float32) * ramps[None, :, None] + rng.normal(0, 8, (48, 64, 3)).astype(np.float32)
    image = face.astype(np.float32) + cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.standard_normal(image.shape, dtype=np.float32) * grain
    return np.clip(image, 0, 255).astype(np.uint8)
