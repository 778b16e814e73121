"""Decode speed on one core: the full decode + resize (the old path) vs decode_image (reduced for large JPEGs).

    python bench/decode_speed.py [--photos 4] [--faces 200] [--repeats 3]

Generates 4000x3000 JPEGs (~2-2.5 MB: a drawn face scaled up, colour gradients,
blotches and grain) and synthetic faces (200-800 px, happysad.synth), then
prints img/s per method (median and min-max over the repeats), the ratio, and
the mean / max absolute difference (0-255) of each method's 256x256 output
against a full decode + INTER_AREA resize.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np

from happysad.decode import decode_image, header_size, read_flag
from happysad import synth
from happysad.synth import sample

SIZE = 256


def photo(seed: int, width: int = 4000, height: int = 3000) -> bytes:
    """A 12 MP JPEG of about 2.3 MB: the grain makes the file photo-sized."""
    ok, buf = cv2.imencode(".jpg", synth.photo(seed, width, height, grain=4.5), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def full_decode(data: bytes, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """What decode_image did for every image before: full-size RGB decode, then one resize."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    return cv2.resize(image, (SIZE, SIZE), interpolation=interpolation)


def rate(fn, images: list[bytes], repeats: int) -> list[float]:
    """img/s of fn over all images, once per repeat."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for data in images:
            fn(data)
        rates.append(len(images) / (time.perf_counter() - start))
    return rates


def quality(fn, images: list[bytes]) -> tuple[float, int]:
    """Mean and max abs difference against full decode + INTER_AREA, over all images."""
    diffs = [np.abs(fn(d).astype(np.int16) - full_decode(d, cv2.INTER_AREA)) for d in images]
    return float(np.mean([d.mean() for d in diffs])), int(max(d.max() for d in diffs))


def row(name: str, images: list[bytes], repeats: int) -> str:
    fn_rates = {"full": [], "reduced": []}
    for _ in range(repeats):  # interleaved, so drift in machine speed hits both alike
        fn_rates["full"] += rate(full_decode, images, 1)
        fn_rates["reduced"] += rate(decode_image, images, 1)
    full, reduced = (statistics.median(fn_rates[k]) for k in ("full", "reduced"))
    spread = {k: f"{min(v):.1f}-{max(v):.1f}" for k, v in fn_rates.items()}
    (fm, fx), (rm, rx) = quality(full_decode, images), quality(decode_image, images)
    reduced_share = np.mean([read_flag("jpeg", header_size(d, "jpeg"), SIZE) != cv2.IMREAD_COLOR_RGB for d in images])
    mb = np.mean([len(d) for d in images]) / 1e6
    return (
        f"| {name} (n={len(images)}, {mb:.2f} MB, {reduced_share:.0%} reduced) "
        f"| {full:.1f} ({spread['full']}) | {reduced:.1f} ({spread['reduced']}) | {reduced / full:.2f}x "
        f"| {fm:.2f} / {fx} | {rm:.2f} / {rx} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--faces", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # one core: what one Ray decode task gets
    photos = [photo(seed) for seed in range(args.photos)]
    faces = [s.data for s in (sample(0, i) for i in range(args.faces * 2)) if s.extension == "jpg"][: args.faces]
    print(f"OpenCV {cv2.__version__}, 1 thread, {args.repeats} repeats; img/s median (min-max); abs diff vs full + INTER_AREA")
    print("| images | full + linear img/s | decode_image img/s | ratio | full + linear diff mean / max | decode_image diff mean / max |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(row("12 MP photos 4000x3000", photos, args.repeats))
    print(row("faces 200-800 px", faces, args.repeats))


if __name__ == "__main__":
    main()
