"""Scoring inputs: files, folders, s3:// prefixes and archives -> rows {path, source, size, bytes, error}.

Every input becomes exactly one row. The driver resolves each --input to an
absolute URI, lists it (hidden names skipped and counted), drops what the
output folder holds, and de-duplicates, so overlapping or differently spelled
inputs give one row per file. Files are read later, in Ray: an unreadable
one becomes a row with error `read_failed`, and one larger than the size
limit becomes `too_large` without being read. Archives (tar, tar.gz, zip;
local or S3) are never extracted and never held whole: a plain tar's or a zip's
members become rows pointing into it, read where they are decoded; a gzip'd
tar's members are streamed out in bounded blocks. A member's path is
`ARCHIVE_URI#MEMBER`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from happysad import storage
from happysad.storage import UsageError

COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz")
ARCHIVE_SUFFIXES = (".tar", *COMPRESSED_TAR_SUFFIXES, ".zip")
ROW_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("source", pa.binary()),  # what to read: a file, or the archive that holds a member; b"" when `bytes` is set
        ("size", pa.int64()),
        ("offset", pa.int64()),  # WHOLE for a file; a tar member's data offset in `source`, a zip member's index
        ("bytes", pa.binary()),
        ("error", pa.string()),
        ("error_detail", pa.string()),  # the exception's class and first line, or what the error means
        ("version", pa.string()),  # an archive member's: its archive as listed (storage.version), checked when read
    ]
)
WHOLE = -1
BLOCK_MEMBERS = 256  # an archive is emitted in blocks of at most this many members...
BLOCK_BYTES = 8 << 20  # ...or this many bytes (a compressed tar's members travel in them): memory follows the block
TAR_READ_AHEAD = 256 << 10  # one request reads this much: the headers of several small members
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: no offsets to point at; members are carried
READER_MEMORY = 512 << 20  # what an archive reader may hold: a block, Ray's output buffer, the largest member
CHANGED = "changed since it was listed"


def is_archive(uri: str) -> bool:
    return uri.lower().endswith(ARCHIVE_SUFFIXES)


def is_compressed_tar(uri: str) -> bool:
    """Named as a compressed tar: its reader will carry the members' bytes (told by name, without a read;
    the reader itself goes by content, COMPRESSED_MAGIC)."""
    return uri.lower().endswith(COMPRESSED_TAR_SUFFIXES)


@dataclass
class Inputs:
    files: pa.Table  # ROW_SCHEMA rows of plain files, sorted by path, unique
    archives: list[storage.Listed]
    hidden: int  # hidden files skipped while listing, each counted once
    empty: tuple[str, ...] = ()  # inputs that exist and list no file at all


def absolute(uri: str) -> str:
    """An --input or --output value as the absolute URI that outputs name it by."""
    return storage.s3_uri(uri[len("s3://") :].rstrip("/")) if storage.is_s3(uri) else storage.display_path(storage.local_source(uri))


def describe(exc: BaseException) -> str:
    """An exception as an `error_detail`: its class and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def expand(uris: list[str], output: str = "") -> Inputs:
    """Everything under the given inputs, once each, minus anything inside `output` (links resolved).

    An input that does not exist, or whose store cannot be reached, is a usage error. Any
    other failure to list one input becomes that input's `read_failed` row.
    """
    found: dict[str, storage.Listed] = {}
    failed: dict[str, str] = {}
    hidden, empty = set(), []
    for uri in uris:
        try:
            listed, skipped = storage.list_files(uri, skip=output)
        except FileNotFoundError:
            raise UsageError(f"--input {uri}: no such file, folder or prefix") from None
        except OSError as exc:
            raise UsageError(f"--input {uri}: cannot be listed: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - one input's failure is its row, never the job's
            failed[absolute(uri)] = describe(exc)
            continue
        if not listed and not skipped:
            if not _exists(uri):
                raise UsageError(f"--input {uri}: no such file, folder or prefix")
            empty.append(uri)
        hidden.update(skipped)
        found.update((item.uri, item) for item in listed)
    # A zero-byte archive has no members to list: scored as a file, it is `empty` like any empty file.
    files = [found[k] for k in sorted(found) if not is_archive(k) or not found[k].size]
    archives = [found[k] for k in sorted(found) if is_archive(k) and found[k].size]
    failed = {uri: detail for uri, detail in failed.items() if uri not in found}
    return Inputs(file_rows(files, failed), archives, len(hidden), tuple(empty))


def pending(found: Inputs, done: np.ndarray) -> Inputs:
    """The inputs that have no row yet: files whose path hash is not in `done`, archives without a row of
    their own (an archive's `empty` row makes it done; members already scored are skipped as it is read)."""
    files = found.files.filter(pa.array(~done_mask(done, path_hashes(found.files["path"].to_pylist()))))
    archives = [a for a in found.archives if not done_mask(done, path_hashes([a.uri]))[0]]
    return Inputs(files, archives, found.hidden)


def _exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    return storage.file_type(uri) != pafs.FileType.NotFound


def file_rows(files: list[storage.Listed], failed: dict[str, str] | None = None) -> pa.Table:
    """ROW_SCHEMA rows for listed files, to be read later; plus a `read_failed` row per input whose listing failed."""
    failed = failed or {}
    n = len(files)
    return pa.table(
        {
            "path": [f.uri for f in files] + list(failed),
            "source": [f.source for f in files] + [b""] * len(failed),
            "size": [f.size for f in files] + [0] * len(failed),
            "offset": pa.array([WHOLE] * (n + len(failed)), pa.int64()),
            "bytes": pa.array([b""] * (n + len(failed)), pa.binary()),
            "error": [None] * n + ["read_failed"] * len(failed),
            "error_detail": [None] * n + list(failed.values()),
            "version": pa.nulls(n + len(failed), pa.string()),
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
    """Fill `bytes` of every row that has a source and no error yet; failures become error rows.

    Whatever one read raises is that row's `read_failed`, with the exception in
    `error_detail`. Members of one archive are read with one ranged read per run of
    neighbouring members (tar headers between them are read and dropped): a batch of
    small faces from an S3 tar is a few requests, not one per face.
    """
    rows = _Rows(batch)
    members: dict[bytes, list[int]] = {}
    for i, (source, size, offset) in enumerate(zip(batch["source"], batch["size"], batch["offset"])):
        if rows.errors[i] or not source:
            continue
        if size > max_bytes:
            rows.fail(i, "too_large", f"{size} bytes, over the {max_bytes >> 20} MB limit (--max-file-mb)")
        elif size == storage.NOT_A_FILE:
            rows.fail(i, "read_failed", "not a regular file: a link to a folder, a FIFO, a device, or a folder that cannot be read")
        elif offset != WHOLE:
            members.setdefault(source, []).append(i)
        else:
            try:
                with storage.open_source(source) as stream:
                    rows.data[i] = stream.read(max_bytes + 1)
                if len(rows.data[i]) > max_bytes:  # grew since it was listed
                    rows.fail(i, "too_large", f"over the {max_bytes >> 20} MB limit (--max-file-mb)")
            except Exception as exc:  # noqa: BLE001 - one file's failure is its row, never the job's
                rows.fail(i, "read_failed", describe(exc))
    for source, indexes in members.items():
        read = _read_zip_members if source.lower().endswith(b".zip") else _read_tar_members
        try:
            _unchanged(source, indexes, batch)
            read(source, indexes, batch, rows, max_bytes)
            _unchanged(source, indexes, batch)  # rewritten while we read: what we read may mix two versions
        except Exception as exc:  # noqa: BLE001 - the archive's failure is its members' rows, never the job's
            for i in indexes:
                rows.fail(i, "read_failed", describe(exc))
    return batch | rows.columns()


class _Rows:
    """The `bytes`, `error` and `error_detail` columns of a batch, filled in as it is read."""

    def __init__(self, batch: dict):
        self.data = list(batch["bytes"])
        self.errors = [e if isinstance(e, str) else None for e in batch["error"]]
        self.details = [d if isinstance(d, str) else None for d in batch.get("error_detail", [None] * len(self.errors))]

    def fail(self, i: int, error: str, detail: str) -> None:
        self.data[i], self.errors[i], self.details[i] = b"", error, detail

    def columns(self) -> dict:
        data = [b"" if error else d for d, error in zip(self.data, self.errors)]
        return {"bytes": data, "error": self.errors, "error_detail": self.details}


class ArchiveChanged(OSError):
    """An archive rewritten between its listing and the read of its members: the offsets point at other bytes."""


def _unchanged(source: bytes, indexes: list[int], batch: dict) -> None:
    now = storage.version(source)
    if any(batch["version"][i] != now for i in indexes):
        raise ArchiveChanged(CHANGED)


SPAN_GAP = 64 << 10  # neighbouring members closer than this are read in one request...
SPAN_BYTES = 16 << 20  # ...of at most this many bytes


def _read_tar_members(source: bytes, indexes: list[int], batch: dict, rows: _Rows, max_bytes: int) -> None:
    """Read tar members given by (offset, size) from `source`; a member cut short is `read_failed`."""
    offsets, sizes = batch["offset"], batch["size"]
    with storage.open_source(source) as archive:
        for span in _spans(sorted(indexes, key=lambda i: offsets[i]), offsets, sizes):
            start = offsets[span[0]]
            try:
                archive.seek(start)
                chunk = archive.read(max(offsets[i] + sizes[i] for i in span) - start)
            except Exception as exc:  # noqa: BLE001 - these members' rows; the next span may still read
                for i in span:
                    rows.fail(i, "read_failed", describe(exc))
                continue
            for i in span:
                at = offsets[i] - start
                rows.data[i] = chunk[at : at + sizes[i]]
                if len(rows.data[i]) != sizes[i]:
                    rows.fail(i, "read_failed", f"the archive ends inside this member ({len(rows.data[i])} of {sizes[i]} bytes)")


def _spans(rows: list[int], offsets, sizes) -> list[list[int]]:
    """Rows sorted by offset, grouped into runs that one ranged read covers (SPAN_GAP, SPAN_BYTES)."""
    spans = [[rows[0]]]
    for i in rows[1:]:
        span = spans[-1]
        gap = offsets[i] - (offsets[span[-1]] + sizes[span[-1]])
        if gap <= SPAN_GAP and offsets[i] + sizes[i] - offsets[span[0]] <= SPAN_BYTES:
            span.append(i)
        else:
            spans.append([i])
    return spans


def read_archive(batch: dict, max_bytes: int, done) -> object:
    """Rows for the members of one archive (a batch of one), yielded in bounded blocks.

    The members of a plain tar or a zip are rows that point into it, read later by
    `read_files` where they are decoded: the reader holds headers, never images, so
    what it sends on is the same for a 100 MB and a 100 GB archive. A compressed tar
    (no offsets to point at) carries its members' bytes, in blocks of bounded size.

    Members whose path hash is in `done` are skipped. A damaged member gets its
    own `read_failed` row and the rest is still read; whatever stops the archive
    from being read further (any exception) adds one `read_failed` row for the
    archive itself; an archive with no members gets one row, error `empty`. A name
    that the archive holds twice gets one row, its first copy's. `done` is a sorted
    array of path hashes, or a Ray reference to one (shared by all tasks).
    """
    import ray

    done = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    (uri,), (source,) = batch["path"], batch["source"]
    block, block_bytes, version = [], 0, None
    seen: set[int] = set()  # path hashes of this archive's members: 8 bytes of hash (~70 in a set) a member
    try:
        version = storage.version(source)  # members point at offsets of this version of the archive
        for member in archive_members(source, max_bytes, by_reference=True):
            path = f"{uri}#{member.name}"
            digest = path_hashes([path])
            if int(digest[0]) in seen:  # appended again (`tar -r`) or forged: one path, one row
                continue
            seen.add(int(digest[0]))
            if done_mask(done, digest)[0]:
                continue
            block.append(member._replace(name=path))
            block_bytes += len(member.data)
            if len(block) >= BLOCK_MEMBERS or block_bytes >= BLOCK_BYTES:
                yield _archive_rows(source, block, version)
                block, block_bytes = [], 0
        if not seen:
            block.append(Member(uri, b"", "empty", detail="an archive with no members"))
    except Exception as exc:  # noqa: BLE001 - the archive's failure is its own row, never the job's
        block.append(Member(uri, b"", "read_failed", detail=describe(exc)))
    if block:
        yield _archive_rows(source, block, version)


def _archive_rows(source: bytes, block: list[Member], version: str | None) -> pa.Table:
    by_reference = [m.offset != WHOLE for m in block]
    return pa.table(
        {
            "path": [m.name for m in block],
            "source": [source if ref else b"" for ref in by_reference],
            "size": [m.size if ref else len(m.data) for m, ref in zip(block, by_reference)],
            "offset": [m.offset for m in block],
            "bytes": [m.data for m in block],
            "error": [m.error for m in block],
            "error_detail": [m.detail for m in block],
            "version": [version if ref else None for ref in by_reference],
        },
        schema=ROW_SCHEMA,
    )


class Member(NamedTuple):
    """An archive member that is not a folder: its bytes, or (`by_reference`) where they are in the archive."""

    name: str
    data: bytes
    error: str | None
    offset: int = WHOLE  # a member read by reference: its data's offset in a tar, its index in a zip's directory
    size: int = 0  # its size, when read by reference
    detail: str | None = None  # what the error means, or the exception that caused it


def archive_members(source: bytes, max_bytes: int, by_reference: bool = False) -> Iterator[Member]:
    """Each member that is not a folder, in archive order. With `by_reference`, the members of a plain
    tar or a zip come as offsets into it rather than bytes (a gzip'd tar has no offsets to point at)."""
    if source.lower().endswith(b".zip"):
        return _zip_members(source, max_bytes, by_reference)
    return _tar_members(source, max_bytes, by_reference)


def _member_name(raw_name: str) -> str:
    # tarfile keeps undecodable name bytes as lone surrogates, which Arrow refuses: write them losslessly.
    try:
        return storage.display_path(raw_name.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a surrogate no byte decodes to (a forged PAX name): kept, %-escaped
        return storage.display_path(raw_name.encode("utf-8", "surrogatepass"))


class ArchiveCutShort(tarfile.TarError):
    """A tar whose member headers stopped at damage, not at its end-of-archive marker."""


def _tar_members(source: bytes, max_bytes: int, by_reference: bool) -> Iterator[Member]:
    info_class = _recording_tarinfo()
    # Seekable, with a read-ahead that serves the headers of small members from one request.
    with storage.open_source(source, TAR_READ_AHEAD) as file:
        plain = by_reference and not file.peek(8).startswith(COMPRESSED_MAGIC)
        end = file.seek(0, io.SEEK_END) if plain else None
        file.seek(0)
        with _open_tar(file, "r:" if plain else "r|*", info_class) as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header it read: 100,000 members would stay in memory
                name = _member_name(member.name)
                if member.isdir():
                    continue
                if not member.isreg():  # links, devices, FIFOs: nothing to score, and never followed
                    yield Member(name, b"", "unsupported", detail=NOT_REGULAR)
                elif member.size > max_bytes:
                    yield Member(name, b"", "too_large", detail=_over(member.size, max_bytes))  # its data is skipped, never held
                elif plain:
                    yield Member(name, b"", None, member.offset_data, member.size)
                    if member.offset_data + member.size > end:  # cut short inside this member: its read fails
                        return
                else:
                    try:
                        data = tar.extractfile(member).read()
                    except Exception as exc:  # noqa: BLE001 - cut short inside this member: nothing after it can be read
                        yield Member(name, b"", "read_failed", detail=describe(exc))
                        return
                    yield Member(name, data, None)
            if _stopped_at_damage(info_class.stop, tar.fileobj):
                raise ArchiveCutShort(f"{storage.display_path(source)}: a damaged header ends the members that could be read")


def _open_tar(file, mode: str, info_class: type[tarfile.TarInfo]) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=file, mode=mode, tarinfo=info_class)
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


def _zip_members(source: bytes, max_bytes: int, by_reference: bool) -> Iterator[Member]:
    with storage.open_source(source) as file, zipfile.ZipFile(file) as archive:  # ranged reads, no local copy
        for index, info in enumerate(archive.infolist()):
            try:
                member = _zip_member(archive, index, info, max_bytes, by_reference)
            except Exception as exc:  # noqa: BLE001 - e.g. IndexError from is_dir() on an empty name: this member's row
                member = Member(_member_name(info.filename), b"", "read_failed", detail=describe(exc))
            if member is not None:
                yield member


def _zip_member(archive: zipfile.ZipFile, index: int, info: zipfile.ZipInfo, max_bytes: int, by_reference: bool) -> Member | None:
    """One zip member's row (None for a folder)."""
    if info.is_dir():
        return None
    name = _member_name(info.filename)
    if not _zip_regular(info):  # a symlink (or device) saved with its Unix mode: never followed
        return Member(name, b"", "unsupported", detail=NOT_REGULAR)
    if info.file_size > max_bytes:
        return Member(name, b"", "too_large", detail=_over(info.file_size, max_bytes))
    if by_reference:
        return Member(name, b"", None, index, info.file_size)
    return Member(name, *_read_zip_member(archive, info, max_bytes))


NOT_REGULAR = "not a regular file: a link, device or FIFO is never followed"


def _over(size: int, max_bytes: int) -> str:
    return f"{size} bytes, over the {max_bytes >> 20} MB limit (--max-file-mb)"


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> tuple[bytes, str | None, int, int, str | None]:
    """(data, error, WHOLE, 0, detail): a Member's fields after its name."""
    try:
        with archive.open(info) as member:
            data = member.read(max_bytes + 1)  # a member may inflate past what it declares
    except Exception as exc:  # noqa: BLE001 - bad CRC, corrupt deflate, encrypted, unknown method...
        return b"", "read_failed", WHOLE, 0, describe(exc)
    if len(data) > max_bytes:
        return b"", "too_large", WHOLE, 0, f"inflates past {max_bytes >> 20} MB (--max-file-mb)"
    return data, None, WHOLE, 0, None


@functools.lru_cache(maxsize=1)
def _open_zip(source: bytes, version: str) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """A zip opened once per process and version for the batches of its members that the process is sent:
    a central directory of 100,000 members is megabytes."""
    archive = zipfile.ZipFile(storage.open_source(source))
    return archive, archive.infolist()


def _read_zip_members(source: bytes, indexes: list[int], batch: dict, rows: _Rows, max_bytes: int) -> None:
    archive, members = _open_zip(source, batch["version"][indexes[0]])  # _unchanged: every row's version is now's
    for i in indexes:
        index = int(batch["offset"][i])
        if index >= len(members):
            rows.fail(i, "read_failed", f"no member {index} in the archive's directory")
            continue
        data, error, _, _, detail = _read_zip_member(archive, members[index], max_bytes)
        if error:
            rows.fail(i, error, detail)
        else:
            rows.data[i] = data


def _zip_regular(info: zipfile.ZipInfo) -> bool:
    """False for a member whose Unix mode (high 16 bits of external_attr) names a file type other than a
    regular file. Many zips store no file type at all (0): those are regular files."""
    kind = stat.S_IFMT(info.external_attr >> 16)
    return kind in (0, stat.S_IFREG)
