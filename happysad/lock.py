"""One writer per output folder: a lock file (local) or object (S3) naming its holder, with a heartbeat.

Taking the lock, free or stale, is one atomic step. On local disk the holder
keeps an flock on the lock file, which the kernel drops when the holder dies:
of two takers the kernel lets one in. On S3 the lock is created with
`If-None-Match: *` and a stale one is taken over with `If-Match: <its ETag>`:
of two takers one PUT succeeds, the other gets 412 (or 409) and reads the winner.
A store that ignores these conditions lets two runs that start within a request's
time of each other, or take over the same stale lock together, both hold it.

A record names its holder by host, boot id, pid and the pid's start time (a pid
alone is reused: a restarted container's job is pid 1 again). The holder is
gone when, on this machine (same host and boot), no process has that pid and
start time; elsewhere, when its heartbeat (refreshed every HEARTBEAT_S) is older
than STALE_S. A killed run therefore never blocks the rerun that finishes its work.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid

from happysad import storage
from happysad.storage import UsageError

HEARTBEAT_S = 20
STALE_S = 120


@contextlib.contextmanager
def held(uri: str, flag: str, value: str):
    """Hold the lock at `uri` for the block, or raise UsageError naming `flag value` if a live run holds it."""
    me = {"run": uuid.uuid4().hex[:12], **_identity(os.getpid())}
    lock = _S3Lock(uri) if storage.is_s3(uri) else _FileLock(uri)
    owner = lock.take(me)
    if owner is not None:
        raise UsageError(
            f"{flag} {value}: another run (pid {owner.get('pid', '?')} on {owner.get('host', '?')}) is writing there; "
            f"wait for it, or remove {uri} if that run is gone"
        )
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, me, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        lock.release()


class _FileLock:
    def __init__(self, path: str):
        self.path, self.fd = path, -1

    def take(self, me: dict) -> dict | None:
        """Take the lock and write our record; None if taken, else the live holder's record."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return _read_settled(self.path) or {}
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed it between our open and flock: lock the file there now
        owner = _parse(os.pread(fd, 1 << 16, 0))
        # Holding the flock, a live holder can only be one that keeps none: on another host, or an older version.
        if owner is not None and _alive(owner):
            os.close(fd)
            return owner
        self.fd = fd
        self.beat(me)
        return None

    def beat(self, me: dict) -> bool:
        data = _record(me)
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))
        return True

    def release(self) -> None:
        if _same_file(self.fd, self.path):
            os.unlink(self.path)  # while locked: a taker that then locks this file sees it gone and opens anew
        os.close(self.fd)


class _S3Lock:
    def __init__(self, uri: str):
        self.bucket, _, self.key = uri[len("s3://") :].partition("/")
        self.client, self.etag = storage.s3_client(), None

    def take(self, me: dict) -> dict | None:
        """Take the lock and write our record; None if taken, else the live holder's record."""
        for _ in range(5):
            if self._put(_record(me), if_match=None):
                return None
            owner, etag = self._get()
            if etag is None:  # removed meanwhile, or a racing create not readable yet: try again
                time.sleep(1)
            elif (owner or {}).get("run") == me["run"]:  # our own PUT, stored but its answer lost
                self.etag = etag
                return None
            elif owner is not None and _alive(owner):
                return owner
            elif self._put(_record(me), if_match=etag):  # stale: take it over unless another taker did first
                return None
        return owner or {}

    def beat(self, me: dict) -> bool:
        """Refresh our record; False if another run has taken the lock over (this one was thought dead)."""
        if self._put(_record(me), if_match=self.etag):
            return True
        owner, etag = self._get()
        if (owner or {}).get("run") != me["run"]:
            return False
        self.etag = etag  # our own PUT, stored but its answer lost
        return True

    def release(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except ClientError as exc:
            if _code(exc) not in ("PreconditionFailed", "NoSuchKey"):  # taken over or removed: not ours to remove
                raise

    def _put(self, data: bytes, if_match: str | None) -> bool:
        """PUT `data` if the object is absent (if_match None) or still has ETag `if_match`; False if not."""
        from botocore.exceptions import ClientError

        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        try:
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
            return True
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return False
            raise

    def _get(self) -> tuple[dict | None, str | None]:
        """(record, ETag) of the lock object; (None, None) if there is none."""
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if _code(exc) == "NoSuchKey":
                return None, None
            raise
        return _parse(answer["Body"].read()), answer["ETag"]


def _code(exc) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def _identity(pid: int) -> dict:
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "started": _start_time(pid)}


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:  # not Linux: records carry host and pid only
        return None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (/proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])  # fields after the name, which may hold spaces


def _record(me: dict) -> bytes:
    return json.dumps(me | {"heartbeat": time.time()}).encode()


def _parse(data: bytes) -> dict | None:
    try:
        owner = json.loads(data)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) else None


def _read_settled(path: str) -> dict | None:
    """The holder's record; a holder that has just locked may not have written it yet."""
    for _ in range(5):
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                if (owner := _parse(f.read())) is not None:
                    return owner
        time.sleep(0.1)
    return None


def _same_file(fd: int, path: str) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _alive(owner: dict) -> bool:
    if owner.get("host") == socket.gethostname() and owner.get("boot") in (None, _boot_id()):
        try:
            pid = int(owner["pid"])
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        except (KeyError, ValueError, TypeError):
            return True  # a record we cannot read: assume live
        started = owner.get("started")
        return started is None or _start_time(pid) in (None, started)  # same pid, other start: a new process
    # Another machine, or this host name on another boot (rebooted, or another machine of that name).
    return time.time() - float(owner.get("heartbeat") or 0) < STALE_S


def _heartbeat(lock, me: dict, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            if not lock.beat(me):
                return  # taken over: beating on would overwrite the new holder's record
        except Exception:  # a passing storage error (OSError, botocore's): the next beat tries again
            pass
