"""Train/val/test assignment by a hash of each file's bytes.

Hashing the content (not the name or the position) means: the same seed and
data give the same split; a file keeps its split when others are added; and
byte-identical duplicates always land in the same split, so none leaks from
train into test.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")


def split_of(data: bytes, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.1) -> str:
    digest = hashlib.blake2b(data, digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    u = int.from_bytes(digest, "little") / 2**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"
