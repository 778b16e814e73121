"""Filesystems for URIs (local paths and s3://), built in one place, and atomic writes.

A bare `pyarrow.fs.S3FileSystem()` ignores AWS_ENDPOINT_URL (FIELD_NOTES), so
every S3 filesystem in the project comes from `filesystem()` below, which
honours AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and otherwise the standard AWS
credential chain (environment, profile, instance profile).

Retries are configured here, once: every S3 request, pyarrow's or boto3's, is
tried S3_MAX_ATTEMPTS times with the SDKs' standard (jittered exponential)
backoff before it fails. `console.join_ray` passes the S3 endpoint and region on to Ray
workers, which otherwise inherit the raylet's environment, not the driver's.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs


class UsageError(Exception):
    """Bad arguments or unusable input: reported as one line, exit code 2."""


class JobFailed(Exception):
    """A job that started and could not finish (a lost node with no room left): one line, exit code 1."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


# Attempts per S3 request (the first included), for pyarrow and boto3 alike. The standard backoff
# (jittered, doubling, capped at 20 s) makes a dead endpoint fail a request in ~20-35 s, while a
# request that fails 1 time in 10 still succeeds 999,999 times in a million.
S3_MAX_ATTEMPTS = 6
# Passed on to Ray workers by `console.join_ray`. Credentials are not: they would show in the job's runtime
# environment (dashboard, logs); each node takes its own from the standard chain.
RAY_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


class _S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem that keeps our retry strategy when pickled to a Ray worker.

    pyarrow's own pickling leaves the retry strategy out, so a filesystem handed to
    Ray Data or Ray Train would fall back to pyarrow's default (3 attempts) there.
    """

    def __reduce__(self):
        _, (options,) = super().__reduce__()
        return _s3_from_options, (options,)


def _s3_from_options(options: dict) -> pafs.S3FileSystem:
    return _S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS))


def boto_config():
    """botocore's settings for every boto3 client the project makes: the same bounded retries as pyarrow."""
    from botocore.config import Config

    # botocore's `max_attempts` counts retries only; `total_max_attempts` counts as pyarrow does.
    return Config(retries={"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})


def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint(), config=boto_config())


def ray_env_vars() -> dict[str, str]:
    """This process's S3 endpoint and region variables, for Ray workers' `runtime_env`.

    Ray workers inherit the raylet's environment, not the driver's: without these, a job run
    with AWS_ENDPOINT_URL set would list through that endpoint but read and write elsewhere.
    """
    return {k: os.environ[k] for k in RAY_FORWARDED_ENV if k in os.environ}


_BUCKET_REGIONS: dict[str, str] = {}  # bucket -> region, asked of AWS once per process


def s3_filesystem(bucket: str | None = None) -> pafs.S3FileSystem:
    endpoint = s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint is None:
        # With no region set the SDK takes the node's own, and a bucket in another region answers
        # HTTP 301. Ask AWS where the bucket is: always a real AWS call, so never with an endpoint.
        if region is None and bucket:
            if bucket not in _BUCKET_REGIONS:
                try:
                    _BUCKET_REGIONS[bucket] = pafs.resolve_s3_region(bucket)
                except (OSError, ValueError) as exc:  # no such bucket, no network, not a bucket name
                    raise UsageError(f"cannot find the region of bucket s3://{bucket}: {exc}") from None
            region = _BUCKET_REGIONS[bucket]
        return _s3_from_options({"region": region})
    scheme = "http" if endpoint.startswith("http://") else "https"
    return _s3_from_options({"endpoint_override": endpoint, "scheme": scheme, "region": region or "us-east-1"})


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or s3:// URI."""
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        return s3_filesystem(bucket=path.split("/", 1)[0]), path
    return pafs.LocalFileSystem(), str(local_path(uri).resolve())


def to_uri(path: str, like: str) -> str:
    """Put back the scheme that pyarrow and Ray strip from S3 paths."""
    return f"s3://{path}" if is_s3(like) and not is_s3(path) else path


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if is_s3(uri) else str(local_path(uri).joinpath(*parts))


def local_path(uri: str) -> Path:
    """A local path value as every function here reads it: `~` expanded, relative to the working folder."""
    return Path(uri).expanduser().absolute()


def expand_uri(uri: str) -> str:
    """A command-line path or URI with a leading `~` expanded, as the shell does for `--output ~/x` but not for
    `--output=~/x`: the whole program then sees one spelling. s3:// URIs as given."""
    return uri if is_s3(uri) else os.path.expanduser(uri)


def file_type(uri: str) -> pafs.FileType:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type
    except OSError as exc:  # e.g. a missing bucket or refused credentials
        raise UsageError(f"cannot reach {uri}: {exc}") from None


class Listed(NamedTuple):
    """One file found under an input: `uri` is how outputs name it, `source` is what opens it."""

    uri: str
    source: bytes  # a local path's raw bytes (any name, UTF-8 or not), or an s3:// URI
    size: int


def display_path(raw: bytes) -> str:
    """A name as outputs write it, one-to-one: `%`, `#` and every byte that is not UTF-8 become %XX.

    Every other character is kept as it is. Escaping `%` whatever the name keeps two
    names apart that would otherwise print alike (`caf%E9.jpg` in UTF-8 and `caf\xe9.jpg`
    in Latin-1); escaping `#` keeps `#` free to join an archive and its member
    (`a.tar%23x.jpg` is a file, `a.tar#x.jpg` a member). Arrow strings must be UTF-8;
    `urllib.parse.unquote_to_bytes` gives the exact bytes back.
    """
    text = raw.decode("utf-8", "surrogateescape")
    if text.isascii() and "%" not in text and "#" not in text:  # most names: nothing to escape
        return text
    return "".join(_ESCAPED.get(c) or (f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF else c) for c in text)


_ESCAPED = {"%": "%25", "#": "%23"}


def local_source(uri: str) -> bytes:
    """The absolute local path of a command-line value, as raw bytes (argv keeps odd bytes as surrogates)."""
    return os.path.abspath(os.path.expanduser(os.fsencode(uri)))


def list_files(uri: str, skip: str = "") -> tuple[list[Listed], list]:
    """(files under a folder or prefix, or the one file named; the hidden files skipped, by name).

    Hidden means a name starting with '.' at any depth below `uri`. Nothing else
    is skipped: unlike Ray's listing, names starting with '_' are files like any other.
    Files whose real location is `skip` or under it (links resolved) are left out.
    A folder that cannot be read is listed as a file that cannot be opened.
    """
    if is_s3(uri):
        return _list_s3(uri, skip)
    files, hidden = [], []
    real_skip = os.path.realpath(local_source(skip)) if skip and not is_s3(skip) else None
    for raw, size in _walk_local(local_source(uri), real_skip):
        if size is None:
            hidden.append(raw)
        else:
            files.append(Listed(display_path(raw), raw, size))
    return files, hidden


NOT_A_FILE = -1  # the size of a listed entry that must not be opened: a FIFO, device, socket or link to a folder


def _walk_local(path: bytes, skip: bytes | None) -> Iterator[tuple[bytes, int | None]]:
    """(raw path, size) of each entry under `path`; size None for each hidden one.

    Links to folders are not followed (no cycles); they, anything that is not a
    regular file, and folders that cannot be read are listed with size NOT_A_FILE,
    so that they get an error row instead of vanishing, and are never opened (a
    FIFO would block). Entries whose real path is `skip` or under it are left out:
    since no folder link is followed, a real path is its folder's plus its name.
    """
    info = os.stat(path)
    real = os.path.realpath(path)
    if _under(real, skip):
        return
    if not stat.S_ISDIR(info.st_mode):
        yield path, info.st_size if stat.S_ISREG(info.st_mode) else NOT_A_FILE
        return
    stack = [(path, real, False)]
    while stack:
        folder, real_folder, hidden = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError:  # no permission, or gone: the folder gets a row of its own
            yield folder, NOT_A_FILE
            continue
        with entries:
            for entry in entries:
                real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real_folder, entry.name)
                inside = hidden or entry.name.startswith(b".")
                if _under(real, skip):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, real, inside))
                elif inside:
                    yield entry.path, None
                else:
                    yield entry.path, _entry_size(entry)


def _entry_size(entry: os.DirEntry) -> int:
    try:
        return entry.stat().st_size if entry.is_file() else NOT_A_FILE
    except OSError:  # gone since the folder was read, or a link into a folder we may not enter
        return NOT_A_FILE


def _under(path: bytes, folder: bytes | None) -> bool:
    return folder is not None and (path == folder or path.startswith(folder.rstrip(b"/") + b"/"))


def s3_uri(path: str) -> str:
    """The URI outputs name an S3 object by (`bucket/key` as pyarrow lists it), escaped as display_path does."""
    return "s3://" + display_path(path.encode())


def _list_s3(uri: str, skip: str) -> tuple[list[Listed], list]:
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.is_file:
        return [Listed(s3_uri(root), f"s3://{root}".encode(), info.size)], []
    files, hidden = [], []
    skip_prefix = skip.rstrip("/")[len("s3://") :] + "/" if is_s3(skip) else None
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if not entry.is_file or (skip_prefix and (entry.path + "/").startswith(skip_prefix)):
            continue
        if _hidden(posixpath.relpath(entry.path, root)):
            hidden.append(entry.path)
        else:
            files.append(Listed(s3_uri(entry.path), f"s3://{entry.path}".encode(), entry.size))
    return files, hidden


def open_source(source: bytes, buffer_bytes: int = io.DEFAULT_BUFFER_SIZE):
    """A seekable binary file for a `Listed.source`: a local path's raw bytes or an s3:// URI. On S3 each
    read is a ranged GET; `buffer_bytes` of read-ahead serve many small reads (headers) from one request."""
    if source.startswith(b"s3://"):
        fs, path = filesystem(source.decode())
        try:
            file = fs.open_input_file(path)
        except pa.ArrowInvalid:  # a key pyarrow refuses (an empty path component: `a//b.jpg`), legal in S3
            file = _BotoObject(path)
        return io.BufferedReader(_S3File(file), buffer_bytes)
    return open(source, "rb", buffering=buffer_bytes)


class _BotoObject:
    """An S3 object read through boto3, with the three methods of pyarrow's file that _S3File uses."""

    def __init__(self, path: str):
        self._bucket, _, self._key = path.partition("/")
        self._client = s3_client()
        self._size = self._client.head_object(Bucket=self._bucket, Key=self._key)["ContentLength"]

    def size(self) -> int:
        return self._size

    def read_at(self, size: int, position: int) -> bytes:
        answer = self._client.get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={position}-{position + size - 1}")
        return answer["Body"].read()

    def close(self) -> None:
        pass


# The AWS SDK files an error answer (503 SlowDown, 500) to a read smaller than that answer's XML body as a
# final INTERNAL_FAILURE and never retries it (apache/doris#66557 traces why); such a read is tried again here.
_MISFILED = "Failed to flush response stream"


class _S3File(io.RawIOBase):
    """pyarrow's S3 file as a seekable raw file whose reads are retried as every other S3 request is."""

    def __init__(self, file):
        self._file, self._size, self._position = file, file.size(), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence] + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def readinto(self, buffer) -> int:
        if self._position >= self._size:
            return 0
        data = self._read_at(min(len(buffer), self._size - self._position), self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def readall(self) -> bytes:  # one request for the rest, not RawIOBase's loop of 8 KB reads
        data = self._read_at(self._size - self._position, self._position) if self._position < self._size else b""
        self._position += len(data)
        return data

    def _read_at(self, size: int, position: int) -> bytes:
        for attempt in range(1, S3_MAX_ATTEMPTS + 1):
            try:
                return self._file.read_at(size, position)
            except OSError as exc:
                if _MISFILED not in str(exc) or attempt == S3_MAX_ATTEMPTS:
                    raise
                time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def version(source: bytes) -> str:
    """What tells a file rewritten since it was listed: size, mtime and inode locally, the ETag on S3."""
    if source.startswith(b"s3://"):
        bucket, _, key = source.decode()[len("s3://") :].partition("/")
        return s3_client().head_object(Bucket=bucket, Key=key)["ETag"]
    info = os.stat(source)
    return f"{info.st_size}:{info.st_mtime_ns}:{info.st_ino}"


def list_dir(uri: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """Entries under a folder or prefix, hidden names (leading '.') skipped."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    return [i for i in infos if not _hidden(posixpath.relpath(i.path, path))]


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def read_bytes(uri: str) -> bytes:
    with open_source(uri.encode() if is_s3(uri) else local_source(uri)) as stream:
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
    target = local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def write_parquet(uri: str, table) -> None:
    """Write a pyarrow table as one Parquet file, atomically (write_bytes)."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def delete(uri: str) -> None:
    """Delete one file or object; a missing one is fine."""
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
