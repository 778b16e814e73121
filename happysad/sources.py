"""URIs (local folders, s3:// prefixes, WebDataset shards) -> Ray Datasets of image bytes.

Labelled rows for training are {path, bytes, label}; `path` is always a full
URI (Ray strips the `s3://` scheme; we put it back). Unusable URIs fail here,
before any work starts, with a UsageError naming the URI and what was found.
"""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow.fs as pafs
import ray
from ray.data import FileShuffleConfig

from happysad import storage
from happysad.storage import UsageError

CLASSES = ("happy", "sad")  # index = label id: happy 0, sad 1 (alphabetical, as the seed)
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def labelled_images(uris: list[str], flag: str = "--data", shuffle_seed: int | None = None) -> ray.data.Dataset:
    """One dataset of {path, bytes, label} rows from every URI, class folders and shards alike.

    With `shuffle_seed`, files (or shards) are read in a seeded random order: class
    folders otherwise arrive all-happy then all-sad, which a shuffle buffer cannot mix.
    """
    shuffle = FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    datasets = [_labelled_one(uri, flag, shuffle) for uri in uris]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def _labelled_one(uri: str, flag: str, shuffle) -> ray.data.Dataset:
    kind = storage.file_type(uri)
    if kind == pafs.FileType.NotFound:
        raise UsageError(f"{flag} {uri}: no such folder or prefix")
    if kind != pafs.FileType.Directory:
        raise UsageError(f"{flag} {uri}: is a file; expected a folder with happy/ and sad/ or .tar shards")
    entries = storage.list_dir(uri)
    classes = [e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name in CLASSES]
    shards = sorted(e.path for e in entries if e.is_file and e.base_name.endswith(".tar"))
    if classes:
        return _class_folders(uri, sorted(classes), shuffle)
    if shards:
        return _webdataset_shards(uri, shards, shuffle)
    found = ", ".join(sorted(e.base_name + ("/" if e.type == pafs.FileType.Directory else "") for e in entries)[:8])
    raise UsageError(f"{flag} {uri}: no happy/ or sad/ folder and no .tar shards (found: {found or 'nothing'})")


def _class_folders(uri: str, classes: list[str], shuffle) -> ray.data.Dataset:
    fs, root = storage.filesystem(uri)
    folders = [posixpath.join(root, c) for c in classes]
    ds = ray.data.read_binary_files(folders, filesystem=fs, include_paths=True, shuffle=shuffle)

    def label_from_folder(batch: dict) -> dict:
        # Ray skips hidden names only at the top of each folder; skip them at any depth.
        relative = [posixpath.relpath(p, root).split("/") for p in batch["path"]]
        keep = np.array([not any(part.startswith(".") for part in parts) for parts in relative], dtype=bool)
        return {
            "path": [storage.to_uri(p, uri) for p in batch["path"][keep]],
            "bytes": list(batch["bytes"][keep]),
            "label": [parts[0] for parts, k in zip(relative, keep) if k],
        }

    return ds.map_batches(label_from_folder, batch_format="numpy")


def _webdataset_shards(uri: str, shards: list[str], shuffle) -> ray.data.Dataset:
    fs, _ = storage.filesystem(uri)
    ds = ray.data.read_webdataset(shards, filesystem=fs, decoder=None, shuffle=shuffle)

    def sample_to_row(batch: dict) -> dict:
        paths, images, labels = [], [], []
        for i, key in enumerate(batch["__key__"]):
            suffix = next((s for s in IMAGE_SUFFIXES if s in batch and isinstance(batch[s][i], bytes)), None)
            paths.append(f"{storage.to_uri(batch['__url__'][i], uri)}#{key}.{suffix}")
            images.append(batch[suffix][i] if suffix else b"")
            labels.append(parse_label(batch["cls"][i]) if "cls" in batch else None)
        return {"path": paths, "bytes": images, "label": labels}

    return ds.map_batches(sample_to_row, batch_format="numpy")


def parse_label(raw) -> str | None:
    """A WebDataset `.cls` member (b'happy', b'sad', b'0' or b'1') as a class name, None if neither."""
    if not isinstance(raw, bytes):  # a sample without a .cls member
        return None
    text = raw.decode("utf-8", "replace").strip()
    if text in CLASSES:
        return text
    return CLASSES[int(text)] if text in ("0", "1") else None
