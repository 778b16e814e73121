"""Scoring inputs: files, folders, s3:// prefixes and archives -> rows {path, source, size, bytes, error}.

Every input becomes exactly one row. The driver resolves each --input to an
absolute URI, lists it (hidden names skipped and counted), drops what the
output folder holds, and de-duplicates, so overlapping or differently spelled
inputs give one row per file. Files are read later, in Ray: an unreadable
one becomes a row with error `read_failed`, and one larger than the size
limit becomes `too_large` without being read. Archive members (tar, tar.gz,
zip; local or S3) are streamed out of the archive in bounded blocks, never
extracted and never held whole; a member's path is `ARCHIVE_URI#MEMBER`.
"""

from __future__ import annotations

import hashlib
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from happysad import storage
from happysad.storage import UsageError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
ROW_SCHEMA = pa.schema(
    [("path", pa.string()), ("source", pa.binary()), ("size", pa.int64()), ("bytes", pa.binary()), ("error", pa.string())]
)
BLOCK_MEMBERS = 256  # an archive is emitted in blocks of at most this many members...
BLOCK_BYTES = 32 << 20  # ...or this many bytes, whichever comes first: memory follows the block, not the archive
READER_MEMORY = 512 << 20  # what an archive reader may hold: a block, Ray's output buffer, the largest member
# A damaged member: bad CRC or header (BadZipFile), corrupt deflate or xz data (zlib.error, LZMAError),
# an encrypted member (RuntimeError), an unknown compression (NotImplementedError), a cut-short stream
# (EOFError), offsets that lie (ValueError, OverflowError: a seek before the start or past 2**63),
# a non-UTF-8 name flagged UTF-8 (UnicodeDecodeError, a ValueError), a short header (struct.error).
MEMBER_ERRORS = (
    OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, struct.error,
    RuntimeError, NotImplementedError, ValueError, OverflowError,
)


def is_archive(uri: str) -> bool:
    return uri.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass
class Inputs:
    files: pa.Table  # ROW_SCHEMA rows of plain files, sorted by path, unique
    archives: list[storage.Listed]
    hidden: int  # hidden files skipped while listing


def absolute(uri: str) -> str:
    """An --input or --output value as the absolute URI that outputs name it by."""
    return uri.rstrip("/") if storage.is_s3(uri) else storage.display_path(storage.local_source(uri))


def expand(uris: list[str], output: str = "") -> Inputs:
    """Everything under the given inputs, once each, minus anything inside `output`."""
    found: dict[str, storage.Listed] = {}
    hidden = 0
    inside_output = absolute(output).rstrip("/") + "/" if output else None
    for uri in uris:
        try:
            listed, skipped = storage.list_files(uri)
        except FileNotFoundError:
            raise UsageError(f"--input {uri}: no such file, folder or prefix") from None
        except OSError as exc:
            raise UsageError(f"--input {uri}: cannot be listed: {exc}") from None
        if not listed and not skipped and not _exists(uri):
            raise UsageError(f"--input {uri}: no such file, folder or prefix")
        hidden += skipped
        for item in listed:
            if inside_output is None or not item.uri.startswith(inside_output):
                found[item.uri] = item
    files = [found[k] for k in sorted(found) if not is_archive(k)]
    archives = [found[k] for k in sorted(found) if is_archive(k)]
    return Inputs(_rows(files), archives, hidden)


def _exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    return storage.file_type(uri) != pafs.FileType.NotFound


def _rows(files: list[storage.Listed]) -> pa.Table:
    n = len(files)
    return pa.table(
        {
            "path": [f.uri for f in files],
            "source": [f.source for f in files],
            "size": [f.size for f in files],
            "bytes": pa.array([b""] * n, pa.binary()),
            "error": pa.nulls(n, pa.string()),
        },
        schema=ROW_SCHEMA,
    )


def path_hashes(paths) -> np.ndarray:
    """A 64-bit hash of each path: how resume compares a million paths without holding them."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(p.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") for p in paths],
        dtype=np.uint64,
    )


def done_mask(done: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Which of `hashes` are in `done` (sorted)."""
    if not len(done):
        return np.zeros(len(hashes), bool)
    at = np.minimum(np.searchsorted(done, hashes), len(done) - 1)
    return done[at] == hashes


def read_files(batch: dict, max_bytes: int) -> dict:
    """Fill `bytes` of every row that has a source and no error yet; failures become error rows."""
    data, errors = list(batch["bytes"]), [e if isinstance(e, str) else None for e in batch["error"]]
    for i, (source, size) in enumerate(zip(batch["source"], batch["size"])):
        if errors[i] or not source:
            continue
        if size > max_bytes:
            errors[i] = "too_large"
        elif size == storage.NOT_A_FILE:
            errors[i] = "read_failed"
        else:
            try:
                with storage.open_source(source) as stream:
                    data[i] = stream.read(max_bytes + 1)
                errors[i] = "too_large" if len(data[i]) > max_bytes else None  # grew since it was listed
            except OSError:
                errors[i] = "read_failed"
        if errors[i]:
            data[i] = b""
    return batch | {"bytes": data, "error": errors}


def read_archive(batch: dict, max_bytes: int, done) -> object:
    """Rows for the members of one archive (a batch of one), yielded in bounded blocks.

    Members whose path hash is in `done` are skipped. A damaged member gets its
    own `read_failed` row and the rest is still read; damage that stops the
    archive from being read further adds one `read_failed` row for the archive
    itself; an archive with no members gets one row, error `empty`. A name that
    the archive holds twice gets one row, its first copy's. `done` is a sorted
    array of path hashes, or a Ray reference to one (shared by all tasks).
    """
    import ray

    done = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    (uri,) = batch["path"]
    block, block_bytes = [], 0
    seen: set[int] = set()  # path hashes of this archive's members: 8 bytes of hash (~70 in a set) a member
    try:
        for name, data, error in archive_members(uri, max_bytes):
            path = f"{uri}#{name}"
            digest = path_hashes([path])
            if int(digest[0]) in seen:  # appended again (`tar -r`) or forged: one path, one row
                continue
            seen.add(int(digest[0]))
            if done_mask(done, digest)[0]:
                continue
            block.append((path, data, error))
            block_bytes += len(data)
            if len(block) >= BLOCK_MEMBERS or block_bytes >= BLOCK_BYTES:
                yield _archive_rows(block)
                block, block_bytes = [], 0
        if not seen:
            block.append((uri, b"", "empty"))
    except MEMBER_ERRORS:
        block.append((uri, b"", "read_failed"))
    if block:
        yield _archive_rows(block)


def _archive_rows(block: list[tuple[str, bytes, str | None]]) -> pa.Table:
    paths, data, errors = zip(*block)
    n = len(block)
    return pa.table(
        {"path": paths, "source": [b""] * n, "size": [len(d) for d in data], "bytes": data, "error": errors},
        schema=ROW_SCHEMA,
    )


def archive_members(uri: str, max_bytes: int):
    """(name, bytes, error) for each member that is not a folder, in archive order."""
    return _zip_members(uri, max_bytes) if uri.lower().endswith(".zip") else _tar_members(uri, max_bytes)


def _member_name(raw_name: str) -> str:
    # tarfile keeps undecodable name bytes as lone surrogates, which Arrow refuses: write them losslessly.
    return storage.display_path(raw_name.encode("utf-8", "surrogateescape"))


class ArchiveCutShort(tarfile.TarError):
    """A tar whose member headers stopped at damage, not at its end-of-archive marker."""


def _tar_members(uri: str, max_bytes: int):
    info_class = _recording_tarinfo()
    with storage.open_source(uri.encode()) as stream, _open_tar(stream, info_class) as tar:
        while (member := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header it read: 100,000 members would stay in memory
            name = _member_name(member.name)
            if member.isdir():
                continue
            if not member.isreg():  # links, devices, FIFOs: nothing to score, and never followed
                yield name, b"", "unsupported"
            elif member.size > max_bytes:
                yield name, b"", "too_large"  # tarfile skips its data without holding it
            else:
                try:
                    yield name, tar.extractfile(member).read(), None
                except MEMBER_ERRORS:  # cut short inside this member: nothing after it can be read
                    yield name, b"", "read_failed"
                    return
        if _stopped_at_damage(info_class.stop, tar.fileobj):
            raise ArchiveCutShort(f"{uri}: a damaged header ends the members that could be read")


def _open_tar(stream, info_class: type[tarfile.TarInfo]) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=stream, mode="r|*", tarinfo=info_class)
    except TypeError as exc:  # Python 3.11 reads a cut-short gzip header with ord(b""): damage, not a bug of ours
        raise tarfile.ReadError(f"damaged gzip header ({exc})") from None


def _recording_tarinfo() -> type[tarfile.TarInfo]:
    """A TarInfo class that remembers the header error that ended tarfile's member loop.

    In stream mode tarfile takes a bad header (a wrong checksum, a cut-short block) after
    the first member for the end of the archive and stops silently: the members after
    it would vanish without a row. The error it swallowed tells damage from the real end.
    """

    class Recording(tarfile.TarInfo):
        stop: tarfile.HeaderError | None = None

        @classmethod
        def frombuf(cls, buf, encoding, errors):
            try:
                return super().frombuf(buf, encoding, errors)
            except tarfile.HeaderError as exc:
                Recording.stop = exc
                raise

    return Recording


def _stopped_at_damage(stop: tarfile.HeaderError | None, rest) -> bool:
    """Whether the member loop ended at damage: a bad or cut-short header, or data after the end marker.

    A real end is a block of zeros followed by nothing but zeros (padding). Anything else
    left in the stream (a header zeroed by damage hides members after it) is read in
    bounded chunks, never held.
    """
    if isinstance(stop, (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError)):
        return True
    while chunk := rest.read(1 << 16):
        if chunk.count(0) != len(chunk):
            return True
    return False


def _zip_members(uri: str, max_bytes: int):
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f, zipfile.ZipFile(f) as archive:  # ranged reads, no local copy
        for info in archive.infolist():
            if info.is_dir():
                continue
            if not _zip_regular(info):  # a symlink (or device) saved with its Unix mode: never followed
                yield info.filename, b"", "unsupported"
                continue
            if info.file_size > max_bytes:
                yield info.filename, b"", "too_large"
                continue
            try:
                with archive.open(info) as member:
                    data = member.read(max_bytes + 1)  # a member may inflate past what it declares
            except MEMBER_ERRORS:
                yield info.filename, b"", "read_failed"
                continue
            yield (info.filename, b"", "too_large") if len(data) > max_bytes else (info.filename, data, None)


def _zip_regular(info: zipfile.ZipInfo) -> bool:
    """False for a member whose Unix mode (high 16 bits of external_attr) names a file type other than a
    regular file. Many zips store no file type at all (0): those are regular files."""
    kind = stat.S_IFMT(info.external_attr >> 16)
    return kind in (0, stat.S_IFREG)
