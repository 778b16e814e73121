"""The output lock admits one holder at a time: two real processes race for it, again and again.

Each taker, told to go, takes `lock.held`, appends `in` and `out` lines to a log (O_APPEND: the file's
order is the order of the writes) around a short hold, and releases. Two `in` lines without an `out`
between them would be two holders at once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import BUCKET, REPO

from happysad import lock, storage
from happysad.storage import UsageError

TRIALS = 20

TAKER = r"""
import os, sys, time
from happysad import lock, storage

def note(log, word):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{word} {os.getpid()} {time.time():.6f}\n".encode())
    os.close(fd)

hold = float(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:  # one race per line: "URI<TAB>LOG"
    uri, log = line.rstrip("\n").split("\t")
    try:
        with lock.held(uri, "--output", "race"):
            note(log, "in")
            time.sleep(hold)
            note(log, "out")
        print("held", flush=True)
    except storage.UsageError:
        print("refused", flush=True)
"""


class Takers:
    """`n` taker processes, started once, raced on a URI by writing it to all their stdins at once."""

    def __init__(self, n: int, hold: float = 0.2):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.procs = [
            subprocess.Popen([sys.executable, "-c", TAKER, str(hold)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(n)
        ]
        assert [p.stdout.readline() for p in self.procs] == ["ready\n"] * n

    def race(self, uri: str, log: Path) -> list[str]:
        for p in self.procs:
            p.stdin.write(f"{uri}\t{log}\n")
        for p in self.procs:
            p.stdin.flush()
        return [p.stdout.readline().strip() for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
            p.wait(timeout=30)


def most_at_once(log: Path) -> int:
    holders = peak = 0
    for line in log.read_text().splitlines() if log.exists() else []:
        holders += 1 if line.startswith("in ") else -1
        peak = max(peak, holders)
    return peak


def dead_holder(uri: str) -> None:
    """A run that takes the lock and is killed (SIGKILL) while holding it: its record stays, names a dead pid."""
    holder = subprocess.Popen([sys.executable, "-c", TAKER, "3600"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline() == "ready\n"
        holder.stdin.write(f"{uri}\t{os.devnull}\n")
        holder.stdin.flush()
        deadline = time.monotonic() + 10
        while f'"pid": {holder.pid},' not in (read(uri) or b"").decode():
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.01)
    finally:
        holder.kill()
        holder.wait()


def read(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except OSError:
        return None


def restarted_predecessor(taker_pid: int) -> bytes:
    """The record of a dead run whose pid number is now a live taker's (a restarted container's job is pid 1
    again): same host and boot, another start time, a fresh heartbeat."""
    me = lock._identity(taker_pid)
    return json.dumps(me | {"run": "predecessor", "started": me["started"] - 1, "heartbeat": time.time()}).encode()


def race_trials(takers: Takers, tmp_path: Path, uri: str, present) -> list[int]:
    """TRIALS races on `uri`, each after `present(uri)` sets up the lock's state: never two holders at once,
    at least one holder (the second may take the lock after the first released it); the holders each trial."""
    held = []
    for trial in range(TRIALS):
        present(uri)
        log = tmp_path / f"trial-{trial}.log"
        answers = takers.race(uri, log)
        assert most_at_once(log) <= 1, f"trial {trial}: two holders at once:\n{log.read_text()}"
        assert "held" in answers, f"trial {trial}: a stale, empty or missing lock was refused"
        held.append(answers.count("held"))
        assert read(uri) is None, "a released lock is removed"
    return held


def no_lock(uri: str) -> None:
    storage.delete(uri)


@pytest.mark.parametrize("case", ["dead holder", "empty lock file", "no lock", "pid reused by a live process"])
def test_two_takers_never_hold_a_local_lock_together(tmp_path, case):
    uri = str(tmp_path / "out" / ".lock")
    os.makedirs(os.path.dirname(uri))
    takers = Takers(2)
    present = {
        "dead holder": dead_holder,
        "empty lock file": lambda uri: Path(uri).write_bytes(b""),
        "no lock": no_lock,
        "pid reused by a live process": lambda uri: Path(uri).write_bytes(restarted_predecessor(takers.procs[0].pid)),
    }[case]
    try:
        held = race_trials(takers, tmp_path, uri, present)
    finally:
        takers.close()
    print(f"local, {case}: {held.count(1)}/{TRIALS} trials one holder, {held.count(2)} two in turn")


LOOPER = r"""
import os, random, sys, time
from happysad import lock, storage

flock = lock.fcntl.flock
def slow_flock(fd, operation):  # widen the window between open and flock, where another's release slips in
    time.sleep(random.random() / 500)
    flock(fd, operation)
lock.fcntl.flock = slow_flock
lock._start_time = lambda pid: random.random()  # every record looks dead: only flock and the inode check decide

uri, log, wanted = sys.argv[1], sys.argv[2], int(sys.argv[3])
held = 0
while held < wanted:
    try:
        with lock.held(uri, "--output", "loop"):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, f"in {os.getpid()}\n".encode())
            time.sleep(0.002)
            os.write(fd, f"out {os.getpid()}\n".encode())
            os.close(fd)
        held += 1
    except storage.UsageError:
        pass
"""


def test_takers_in_a_loop_never_overlap(tmp_path):
    """Three processes take and release the lock as fast as they can, each until it has held it 300 times:
    a release (unlink, then unlock) racing another's open and flock never lets two in. Their records are
    made to look dead, so that the flock alone keeps them apart, as when each holder exits after its release."""
    uri, log = str(tmp_path / ".lock"), tmp_path / "loop.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    loopers = [subprocess.Popen([sys.executable, "-c", LOOPER, uri, str(log), "300"], env=env) for _ in range(3)]
    try:
        assert [p.wait(timeout=120) for p in loopers] == [0, 0, 0]
    finally:
        for p in loopers:
            p.kill()
            p.wait()
    assert most_at_once(log) == 1 and len(log.read_text().splitlines()) == 2 * 900
    assert not os.path.exists(uri)


def test_a_live_holder_is_refused_and_the_refusal_names_it(tmp_path):
    uri = str(tmp_path / ".lock")
    with lock.held(uri, "--output", "out"):
        with pytest.raises(UsageError, match=rf"^--output out: another run \(pid {os.getpid()} on {socket.gethostname()}\)"):
            with lock.held(uri, "--output", "out"):
                pass
    assert not os.path.exists(uri)


def test_a_record_with_this_pid_but_another_boot_or_start_is_taken_over(tmp_path):
    """The container-restart case: the record's pid is this process's own number, but not this process."""
    uri = str(tmp_path / ".lock")
    me = lock._identity(os.getpid())
    for other in ({"started": me["started"] + 1, "heartbeat": time.time()}, {"boot": "another-boot", "heartbeat": 0}):
        Path(uri).write_text(json.dumps(me | {"run": "predecessor"} | other))
        with lock.held(uri, "--output", "out"):
            assert json.loads(Path(uri).read_text())["run"] != "predecessor"
    # This very process (pid and start time) is live: refused, whether it keeps an flock or not.
    Path(uri).write_text(json.dumps(me | {"run": "other", "heartbeat": 0}))
    with pytest.raises(UsageError):
        with lock.held(uri, "--output", "out"):
            pass


@pytest.mark.parametrize("case", ["dead holder", "empty lock object"])
def test_two_takers_of_a_stale_s3_lock_one_wins(s3_server, tmp_path, case):
    """A stale S3 lock is taken over with a PUT conditional on its ETag: of two takers racing, one holds it
    (the other's PUT gets 412, and it then finds the winner live), never both at once."""
    uri = f"s3://{BUCKET}/lock-race/{case.replace(' ', '-')}/.lock"
    present = dead_holder if case == "dead holder" else lambda uri: storage.write_bytes(uri, b"")
    takers = Takers(2)
    try:
        held = race_trials(takers, tmp_path, uri, present)
    finally:
        takers.close()
    print(f"S3, {case}: {held.count(1)}/{TRIALS} trials one holder, {held.count(2)} two in turn")


def test_an_s3_lock_taken_over_is_neither_refreshed_nor_removed_by_its_old_holder(s3_server):
    """A run thought dead (heartbeat too old) and taken over must not overwrite or delete the new holder's lock."""
    uri = f"s3://{BUCKET}/lock-race/taken-over/.lock"
    me = {"run": "slow", **lock._identity(os.getpid())}
    old = lock._S3Lock(uri)
    assert old.take(me) is None
    storage.write_bytes(uri, b'{"run": "new"}')  # what a takeover leaves
    assert old.beat(me) is False
    old.release()
    assert json.loads(storage.read_bytes(uri)) == {"run": "new"}
    storage.delete(uri)


def test_of_two_takeovers_of_one_stale_lock_only_one_lands(s3_server):
    """Both takers read the stale lock's ETag before either writes: only the first conditional PUT succeeds."""
    uri = f"s3://{BUCKET}/lock-race/both-read/.lock"
    storage.write_bytes(uri, b'{"run": "dead"}')
    first, second = lock._S3Lock(uri), lock._S3Lock(uri)
    (_, etag), (_, same) = first._get(), second._get()
    assert etag == same
    assert [first._put(b'{"run": "first"}', if_match=etag), second._put(b'{"run": "second"}', if_match=etag)] == [True, False]
    assert json.loads(storage.read_bytes(uri)) == {"run": "first"}
    first.release()
    assert read(uri) is None


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    uri = str(tmp_path / "out" / ".lock")
    with lock.held(uri, "--output", "out"):
        with pytest.raises(UsageError, match="--output out: another run"):
            with lock.held(uri, "--output", "out"):
                pass
    assert not os.path.exists(uri)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(uri).write_text(f'{{"run": "x", "host": "{socket.gethostname()}", "pid": {dead.pid}, "heartbeat": 0}}')
    with lock.held(uri, "--output", "out"):
        assert '"run": "x"' not in Path(uri).read_text()


def test_s3_lock_is_an_exclusive_create(s3_server):
    uri = f"s3://{BUCKET}/locks/.lock"
    with lock.held(uri, "--output", "s3"):
        assert b'"pid"' in storage.read_bytes(uri)
        with pytest.raises(UsageError, match="--output s3: another run"):
            with lock.held(uri, "--output", "s3"):
                pass
    assert storage.file_type(uri) == pafs.FileType.NotFound  # released: the object was deleted
