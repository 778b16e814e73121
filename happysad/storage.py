"""Filesystems for URIs (local paths and s3://), built in one place, and atomic writes.

A bare `pyarrow.fs.S3FileSystem()` ignores AWS_ENDPOINT_URL (FIELD_NOTES), so
every S3 filesystem in the project comes from `filesystem()` below, which
honours AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and otherwise the standard AWS
credential chain (environment, profile, instance profile).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


class UsageError(Exception):
    """Bad arguments or unusable input: reported as one line, exit code 2."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = s3_endpoint()
    if endpoint is None:
        return pafs.S3FileSystem(region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    scheme = "http" if endpoint.startswith("http://") else "https"
    return pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme=scheme,
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or s3:// URI."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def to_uri(path: str, like: str) -> str:
    """Put back the scheme that pyarrow and Ray strip from S3 paths."""
    return f"s3://{path}" if is_s3(like) and not is_s3(path) else path


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if is_s3(uri) else str(Path(uri, *parts))


def file_type(uri: str) -> pafs.FileType:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type
    except OSError as exc:  # e.g. a missing bucket or refused credentials
        raise UsageError(f"cannot reach {uri}: {exc}") from None


def list_dir(uri: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """Entries under a folder or prefix, hidden names (leading '.') skipped."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    return [i for i in infos if not _hidden(posixpath.relpath(i.path, path))]


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: readers see the old file or the new one, never a part.

    An S3 PUT is atomic by itself; locally we write a temporary file and rename it.
    """
    if is_s3(uri):
        fs, path = filesystem(uri)
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
