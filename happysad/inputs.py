"""Scoring inputs: files, folders, s3:// prefixes and archives -> rows {path, bytes, error}.

Every input becomes exactly one row. A file that cannot be read becomes a row
with error `read_failed` instead of failing the job. Archive members are
streamed out of the archive (tar, tar.gz, zip; local or S3), never extracted
to disk; a member's path is `ARCHIVE_URI#MEMBER`.
"""

from __future__ import annotations

import tarfile
import zipfile

import pyarrow.fs as pafs

from happysad import storage
from happysad.storage import UsageError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def is_archive(uri: str) -> bool:
    return uri.lower().endswith(ARCHIVE_SUFFIXES)


def expand(uris: list[str]) -> tuple[list[str], list[str]]:
    """(plain file URIs, archive URIs) under the given inputs; folders are searched recursively."""
    files, archives = [], []
    for uri in uris:
        kind = storage.file_type(uri)
        if kind == pafs.FileType.NotFound:
            raise UsageError(f"--input {uri}: no such file, folder or prefix")
        if kind == pafs.FileType.File:
            found = [uri]
        else:
            found = sorted(storage.to_uri(i.path, uri) for i in storage.list_dir(uri, recursive=True) if i.is_file)
        for path in found:
            (archives if is_archive(path) else files).append(path)
    return files, archives


def read_files(batch: dict) -> dict:
    """Read each file's bytes; an unreadable one keeps empty bytes and `read_failed`."""
    data, errors = [], []
    for uri in batch["path"]:
        try:
            data.append(storage.read_bytes(uri))
            errors.append(None)
        except OSError:
            data.append(b"")
            errors.append("read_failed")
    return {"path": list(batch["path"]), "bytes": data, "error": errors}


def read_archive(row: dict, done: frozenset = frozenset()) -> list[dict]:
    """One row per regular member not already in `done`; a broken archive adds one read_failed row."""
    uri = row["path"]
    rows = []
    try:
        members = _zip_members(uri) if uri.lower().endswith(".zip") else _tar_members(uri)
        for name, data in members:
            path = f"{uri}#{name}"
            if path not in done:
                rows.append({"path": path, "bytes": data or b"", "error": None if data is not None else "read_failed"})
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError):
        if uri not in done:
            rows.append({"path": uri, "bytes": b"", "error": "read_failed"})
    return rows


def _tar_members(uri: str):
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isreg():
                yield member.name, tar.extractfile(member).read()


def _zip_members(uri: str):
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f, zipfile.ZipFile(f) as archive:  # ranged reads, no local copy
        for info in archive.infolist():
            if not info.is_dir():
                try:
                    yield info.filename, archive.read(info)
                except (zipfile.BadZipFile, OSError, NotImplementedError):  # bad CRC, unknown compression
                    yield info.filename, None
