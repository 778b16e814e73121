"""URIs (local folders, s3:// prefixes, WebDataset shards) -> Ray Datasets of image bytes.

Labelled rows for training are {path, bytes, label, error}; `path` is always
a full URI (Ray strips the `s3://` scheme; we put it back). Class folders are
listed by `storage.list_files` (our rules for hidden names, any file name)
and read by Ray tasks; shards are streamed by our own tar reader (`inputs`),
one task a shard, member by member, so no member is held whole past
--max-file-mb. Unusable
URIs fail here, before any work starts, with a UsageError naming the URI and
what was found.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from happysad import inputs, storage
from happysad.model import CLASSES
from happysad.storage import UsageError

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
DEFAULT_MAX_FILE_MB = 64  # a file larger than this is `too_large`, never read into memory
FILES_PER_BLOCK = 128  # listed files per read block: enough blocks to spread decode over a cluster


@dataclass
class Listing:
    """What labelled URIs hold, listed without Ray: files under happy/ or sad/, WebDataset shards, and what
    was skipped ({reason: count}: `hidden`, `no_label`)."""

    uris: list[str]
    images: list[tuple[storage.Listed, str]] = field(default_factory=list)
    shards: list[storage.Listed] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def list_labelled(uris: list[str], flag: str = "--data") -> Listing:
    """Every file under the URIs, sorted into images, shards and skipped; a URI that is missing, a file, or holds
    neither class folders nor shards is a usage error naming `flag`. Runs in the driver before any Ray start:
    a typo costs one listing call, not a cluster.

    Files under happy/ or sad/ (any depth) and WebDataset .tar shards at the top are rows; hidden names (a
    leading '.' at any depth) are counted as `hidden`, other files as `no_label`.
    """
    listing = Listing(list(uris))
    for uri in uris:
        _list_one(uri, flag, listing)
    return listing


def _list_one(uri: str, flag: str, listing: Listing) -> None:
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
    listing.images += images
    listing.shards += shards
    listing.skipped.update({reason: n for reason, n in (("hidden", len(hidden)), ("no_label", unlabelled)) if n})


def labelled_images(
    listing: Listing, shuffle_seed: int | None = None, max_file_mb: int = DEFAULT_MAX_FILE_MB
) -> ray.data.Dataset:
    """One dataset of {path, bytes, label, error} rows from a listing. A row's `error` is set when it could not
    be read (`read_failed`, `too_large`). With `shuffle_seed`, files (or shards) are read in a seeded random
    order: class folders otherwise arrive all-happy then all-sad, which a shuffle buffer cannot mix."""
    parts = []
    if listing.images:
        parts.append(_class_folders(list(listing.images), shuffle_seed, max_file_mb << 20))
    if listing.shards:
        parts.append(_webdataset_shards(listing.shards, shuffle_seed, max_file_mb << 20))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _class_folders(images: list[tuple[storage.Listed, str]], shuffle_seed: int | None, max_bytes: int):
    """Our own listing, read by Ray tasks: Ray's reader would drop `_` names and fail on non-UTF-8 ones."""
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(images)
    table = inputs.file_rows([item for item, _ in images]).append_column("label", pa.array([label for _, label in images]))
    ds = ray.data.from_arrow([table.slice(start, FILES_PER_BLOCK) for start in range(0, len(images), FILES_PER_BLOCK)])
    read = ds.map_batches(inputs.read_files, fn_kwargs={"max_bytes": max_bytes}, batch_size=FILES_PER_BLOCK)
    return read.select_columns(["path", "bytes", "label", "error"])


def _webdataset_shards(shards: list[storage.Listed], shuffle_seed: int | None, max_bytes: int) -> ray.data.Dataset:
    """One read task per shard, streaming its members (Ray's WebDataset reader holds each member whole,
    however large): a member over --max-file-mb is `too_large` unread, a damaged shard `read_failed`."""
    items = [{"path": s.uri, "source": s.source} for s in shards]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    listed = ray.data.from_items(items, override_num_blocks=len(items))
    return listed.map_batches(read_shard, batch_size=1, fn_kwargs={"max_bytes": max_bytes}, batch_format="pyarrow")


_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's split: key up to the basename's first dot


def read_shard(batch, max_bytes: int):
    """{path, bytes, label, error} rows, one per sample (consecutive members sharing a key), yielded in
    blocks of bounded size; damage that stops the shard adds one `read_failed` row for the shard."""
    (uri,), (source,) = batch["path"].to_pylist(), batch["source"].to_pylist()
    rows, size, key, members = [], 0, None, {}
    try:
        for name, data, error, *_ in inputs.archive_members(source, max_bytes):
            match = _KEY_SUFFIX.match(name)
            member_key, suffix = match.groups() if match else (name, "")
            if member_key != key and members:
                rows.append(_sample_row(uri, key, members))
                size, members = size + len(rows[-1]["bytes"]), {}
                if len(rows) >= inputs.BLOCK_MEMBERS or size >= inputs.BLOCK_BYTES:
                    yield _rows_table(rows)
                    rows, size = [], 0
            key, members[suffix.lower()] = member_key, (suffix, data, error)
    except Exception:  # noqa: BLE001 - whatever stops one shard is its row, never the job's
        rows.append({"path": uri, "bytes": b"", "label": None, "error": "read_failed"})
    if members:
        rows.append(_sample_row(uri, key, members))
    if rows:
        yield _rows_table(rows)


def _sample_row(uri: str, key: str, members: dict) -> dict:
    image = next((s for s in members if s in IMAGE_SUFFIXES), None)
    cls = members.get("cls")
    label = parse_label(cls[1]) if cls and cls[2] is None else None
    if image is None:
        return {"path": f"{uri}#{key}", "bytes": b"", "label": label, "error": None}
    suffix, data, error = members[image]
    return {"path": f"{uri}#{key}.{suffix}", "bytes": data, "label": label, "error": error}


def _rows_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema([("path", pa.string()), ("bytes", pa.binary()), ("label", pa.string()), ("error", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def parse_label(raw) -> str | None:
    """A WebDataset `.cls` member (b'happy', b'sad', b'0' or b'1') as a class name, None if neither."""
    if not isinstance(raw, bytes):  # a sample without a .cls member
        return None
    text = raw.decode("utf-8", "replace").strip()
    if text in CLASSES:
        return text
    return CLASSES[int(text)] if text in ("0", "1") else None
