"""URIs (local folders, s3:// prefixes, WebDataset shards) -> Ray Datasets of image bytes.

Labelled rows for training are {path, bytes, label, error}; `path` is always
a full URI (Ray strips the `s3://` scheme; we put it back). Class folders are
listed by `storage.list_files` (our rules for hidden names, any file name)
and read by Ray tasks; shards are read by Ray's WebDataset reader. Unusable
URIs fail here, before any work starts, with a UsageError naming the URI and
what was found.
"""

from __future__ import annotations

import random
from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.data import FileShuffleConfig

from happysad import inputs, storage
from happysad.storage import UsageError

CLASSES = ("happy", "sad")  # index = label id: happy 0, sad 1 (alphabetical, as the seed)
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
DEFAULT_MAX_FILE_MB = 64  # a file larger than this is `too_large`, never read into memory
FILES_PER_BLOCK = 128  # listed files per read block: enough blocks to spread decode over a cluster


def labelled_images(
    uris: list[str], flag: str = "--data", shuffle_seed: int | None = None, max_file_mb: int = DEFAULT_MAX_FILE_MB
) -> tuple[ray.data.Dataset, dict[str, int]]:
    """One dataset of {path, bytes, label, error} rows from every URI, and {reason: count} skipped while listing.

    Every file under a URI is a row or is counted: files under happy/ or sad/ (any
    depth) and WebDataset .tar shards at the top are rows; hidden names (a leading
    '.' at any depth) are counted as `hidden`, other files as `no_label`. A row's
    `error` is set when it could not be read (`read_failed`, `too_large`).
    With `shuffle_seed`, files (or shards) are read in a seeded random order: class
    folders otherwise arrive all-happy then all-sad, which a shuffle buffer cannot mix.
    """
    datasets, skipped = [], Counter()
    for uri in uris:
        ds, listing_skipped = _labelled_one(uri, flag, shuffle_seed, max_file_mb << 20)
        datasets.append(ds)
        skipped.update(listing_skipped)
    return (datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]), dict(skipped)


def _labelled_one(uri: str, flag: str, shuffle_seed: int | None, max_bytes: int):
    kind = storage.file_type(uri)
    if kind == pafs.FileType.NotFound:
        raise UsageError(f"{flag} {uri}: no such folder or prefix")
    if kind != pafs.FileType.Directory:
        raise UsageError(f"{flag} {uri}: is a file; expected a folder with happy/ and sad/ or .tar shards")
    listed, hidden = storage.list_files(uri)
    root = inputs.absolute(uri) + "/"
    images, shards, unlabelled = [], [], 0
    for item in listed:
        parts = item.uri[len(root) :].split("/")
        if parts[0] in CLASSES and len(parts) > 1:
            images.append((item, parts[0]))
        elif len(parts) == 1 and parts[0].lower().endswith(".tar"):
            shards.append(item)
        else:
            unlabelled += 1
    if not images and not shards:
        found = ", ".join(sorted({p.uri[len(root) :].split("/")[0] for p in listed})[:8])
        raise UsageError(f"{flag} {uri}: no files under happy/ or sad/ and no .tar shards (found: {found or 'nothing'})")
    parts = []
    if images:
        parts.append(_class_folders(images, shuffle_seed, max_bytes))
    if shards:
        parts.append(_webdataset_shards(uri, shards, shuffle_seed))
    skipped = {reason: n for reason, n in (("hidden", hidden), ("no_label", unlabelled)) if n}
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), skipped


def _class_folders(images: list[tuple[storage.Listed, str]], shuffle_seed: int | None, max_bytes: int):
    """Our own listing, read by Ray tasks: Ray's reader would drop `_` names and fail on non-UTF-8 ones."""
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(images)
    table = pa.table(
        {
            "path": [item.uri for item, _ in images],
            "source": [item.source for item, _ in images],
            "size": [item.size for item, _ in images],
            "bytes": pa.array([b""] * len(images), pa.binary()),
            "error": pa.nulls(len(images), pa.string()),
            "label": [label for _, label in images],
        }
    )
    blocks = -(-len(images) // FILES_PER_BLOCK)
    ds = ray.data.from_arrow(table).repartition(blocks) if blocks > 1 else ray.data.from_arrow(table)
    read = ds.map_batches(inputs.read_files, fn_kwargs={"max_bytes": max_bytes}, batch_size=FILES_PER_BLOCK)
    return read.select_columns(["path", "bytes", "label", "error"])


def _webdataset_shards(uri: str, shards: list[storage.Listed], shuffle_seed: int | None) -> ray.data.Dataset:
    fs, _ = storage.filesystem(uri)
    paths = [s.uri[len("s3://") :] if storage.is_s3(s.uri) else s.uri for s in shards]
    shuffle = FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, shuffle=shuffle)

    def sample_to_row(batch: dict) -> dict:
        # Member suffixes keep their case in the columns (`KEY.JPG` -> "JPG"): match them case-insensitively.
        image_columns = [c for c in batch if c.lower() in IMAGE_SUFFIXES]
        label_columns = [c for c in batch if c.lower() == "cls"]
        paths, images, labels = [], [], []
        for i, key in enumerate(batch["__key__"]):
            suffix = next((c for c in image_columns if isinstance(batch[c][i], bytes)), None)
            cls = next((batch[c][i] for c in label_columns if isinstance(batch[c][i], bytes)), None)
            member = f"{key}.{suffix}" if suffix else key
            paths.append(f"{storage.to_uri(batch['__url__'][i], uri)}#{member}")
            images.append(batch[suffix][i] if suffix else b"")
            labels.append(parse_label(cls))
        return {"path": paths, "bytes": images, "label": labels, "error": [None] * len(paths)}

    return ds.map_batches(sample_to_row, batch_format="numpy")


def parse_label(raw) -> str | None:
    """A WebDataset `.cls` member (b'happy', b'sad', b'0' or b'1') as a class name, None if neither."""
    if not isinstance(raw, bytes):  # a sample without a .cls member
        return None
    text = raw.decode("utf-8", "replace").strip()
    if text in CLASSES:
        return text
    return CLASSES[int(text)] if text in ("0", "1") else None
