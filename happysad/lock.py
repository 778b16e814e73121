"""One writer per output folder: a lock file (local) or object (S3) holding the owner and a heartbeat.

Taken with an exclusive create (O_EXCL locally, `If-None-Match: *` on S3), so
two runs can never both win. A lock is stale, and taken over, when its owner
is gone: on the same host its process no longer exists; elsewhere its
heartbeat (refreshed every HEARTBEAT_S) is older than STALE_S. A killed run
therefore never blocks the rerun that finishes its work.
"""

from __future__ import annotations

import contextlib
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
    me = {"run": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid()}
    if not _create(uri, _record(me)):
        owner = _read_settled(uri)
        # Our own record: a retried PUT whose first try was stored but whose answer was lost (412 on the retry).
        if owner is not None and owner.get("run") != me["run"] and _alive(owner):
            raise UsageError(
                f"{flag} {value}: another run (pid {owner.get('pid')} on {owner.get('host')}) is writing there; "
                f"wait for it, or remove {uri} if that run is gone"
            )
        storage.write_bytes(uri, _record(me))  # stale: take it over
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(uri, me, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if (_read(uri) or {}).get("run") == me["run"]:
            storage.delete(uri)


def _record(me: dict) -> bytes:
    return json.dumps(me | {"heartbeat": time.time()}).encode()


def _create(uri: str, data: bytes) -> bool:
    """Create the lock only if it does not exist; False if it does."""
    if storage.is_s3(uri):
        return storage.s3_put_if_absent(uri, data)
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    try:
        fd = os.open(uri, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _read(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except (OSError, ValueError):
        return None


def _read_settled(uri: str) -> dict | None:
    """The lock's record; a create that lost a race (S3 409 ConditionalRequestConflict) may find the
    winner's object not readable yet, so wait a moment before taking it for a stale, unreadable lock."""
    for _ in range(5):
        if (owner := _read(uri)) is not None:
            return owner
        time.sleep(1)
    return None


def _alive(owner: dict) -> bool:
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
            return True
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError):
            return True  # someone else's process, or a record we cannot read: assume live
    return time.time() - float(owner.get("heartbeat", 0)) < STALE_S


def _heartbeat(uri: str, me: dict, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            storage.write_bytes(uri, _record(me))
