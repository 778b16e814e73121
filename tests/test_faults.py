"""Faults and hostile input: S3 errors, lost nodes, bombs, oversized files and hostile archives, with nothing lost.

Every test checks the rows (none lost, none twice) against what the input holds.
S3 faults come from a real HTTP hop (tests/faultproxy.py); lost nodes are real
raylets killed with SIGKILL; bombs and hostile archives are written by the test.
"""

from __future__ import annotations

import io
import json
import os
import random
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from conftest import REPO, joined_node, run_cli, wait_for_registered_checkpoint
from happysad import inputs, storage, synth

JPEG = next(s.data for s in (synth.sample(5, i) for i in range(10)) if s.extension == "jpg")
NO_DONE = np.empty(0, np.uint64)


def archive_rows(uri: str, max_bytes: int = 64 << 20) -> list[dict]:
    """The rows scoring gets for an archive: its reader's blocks, with members read by reference filled in."""
    rows = []
    for block in inputs.read_archive({"path": [uri], "source": [uri.encode()]}, max_bytes, NO_DONE):
        read = inputs.read_files(block.to_pydict(), max_bytes)
        rows += [dict(zip(read, values)) for values in zip(*read.values())]
    return rows


def errors_by_member(rows: list[dict]) -> dict:
    """{member name, or "" for the archive's own row: error}; asserts no path came twice."""
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a path has two rows"
    return {r["path"].partition("#")[2]: r["error"] for r in rows}


def read_rows(output: str) -> list[dict]:
    fs, path = storage.filesystem(output)
    return pads.dataset(path, format="parquet", filesystem=fs).to_table().to_pylist()


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def zip_bytes(members: list[tuple[str, bytes, int]]) -> bytes:
    """A zip of (name, data, Unix mode): the mode's file type is how zip tools store links and devices."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.create_system, info.external_attr = 3, mode << 16  # 3: Unix
            archive.writestr(info, data)
    return buffer.getvalue()


# --- hostile archives (item 5) ------------------------------------------------------------------


def hostile_tar() -> bytes:
    return tar_bytes(
        [
            (tar_member("../../x.jpg"), JPEG),
            (tar_member("/etc/x.jpg"), JPEG),
            (tar_member("link.jpg", tarfile.SYMTYPE, "/etc/passwd"), b""),
            (tar_member("hard.jpg", tarfile.LNKTYPE, "../../x.jpg"), b""),
            (tar_member("chr.jpg", tarfile.CHRTYPE), b""),
            (tar_member("blk.jpg", tarfile.BLKTYPE), b""),
            (tar_member("fifo.jpg", tarfile.FIFOTYPE), b""),
            (tar_member("ok.jpg"), JPEG),
        ]
    )


def hostile_zip() -> bytes:
    return zip_bytes(
        [
            ("../../x.jpg", JPEG, stat.S_IFREG | 0o644),
            ("/etc/x.jpg", JPEG, stat.S_IFREG | 0o644),
            ("link.jpg", b"/etc/passwd", stat.S_IFLNK | 0o777),
            ("chr.jpg", b"", stat.S_IFCHR | 0o644),
            ("plain.jpg", JPEG, 0),  # no file type stored at all, as many zip writers do: a regular file
        ]
    )


HOSTILE_TAR_ROWS = {
    "../../x.jpg": None, "/etc/x.jpg": None, "link.jpg": "unsupported", "hard.jpg": "unsupported",
    "chr.jpg": "unsupported", "blk.jpg": "unsupported", "fifo.jpg": "unsupported", "ok.jpg": None,
}
HOSTILE_ZIP_ROWS = {"../../x.jpg": None, "/etc/x.jpg": None, "link.jpg": "unsupported", "chr.jpg": "unsupported", "plain.jpg": None}


def test_escaping_names_links_and_devices_are_rows_never_files(tmp_path):
    """`../../x.jpg` and `/etc/x.jpg` are only names; links and devices (tar types, zip Unix modes) are `unsupported`."""
    (tmp_path / "a.tar").write_bytes(hostile_tar())
    (tmp_path / "a.zip").write_bytes(hostile_zip())
    tar_rows = archive_rows(str(tmp_path / "a.tar"))
    assert errors_by_member(tar_rows) == HOSTILE_TAR_ROWS
    assert errors_by_member(archive_rows(str(tmp_path / "a.zip"))) == HOSTILE_ZIP_ROWS
    assert {r["path"].partition("#")[2]: r["bytes"] for r in tar_rows}["../../x.jpg"] == JPEG
    assert not Path("/etc/x.jpg").exists() and not (tmp_path.parent.parent / "x.jpg").exists()


def with_bad_checksum(data: bytes, member_index: int, size: int) -> bytes:
    """The tar of equal-sized members `data`, with member `member_index`'s header checksum made wrong."""
    header = member_index * (512 + -(-size // 512) * 512)
    damaged = bytearray(data)
    damaged[header + 148 : header + 156] = b"0000001\0"  # chksum field: a value no real header sums to
    return bytes(damaged)


@pytest.mark.parametrize("damage", ["checksum", "zeroed"])
def test_tar_damaged_halfway_gets_a_read_failed_row(tmp_path, damage):
    """Python's tarfile, streaming, takes a bad header after the first member for the end and stops silently:
    the members after it would vanish. The archive gets a `read_failed` row; the members before keep theirs."""
    members = [(tar_member(f"m{i}.jpg"), JPEG) for i in range(6)]
    data = tar_bytes(members)
    if damage == "checksum":
        data = with_bad_checksum(data, 3, len(JPEG))
    else:  # a header block zeroed: it reads as the end-of-archive marker, with members after it
        header = 3 * (512 + -(-len(JPEG) // 512) * 512)
        data = data[:header] + bytes(512) + data[header + 512 :]
    for name, payload in (("cut.tar", data), ("cut.tar.gz", _gzip(data))):
        (tmp_path / name).write_bytes(payload)
        rows = errors_by_member(archive_rows(str(tmp_path / name)))
        assert rows == {"m0.jpg": None, "m1.jpg": None, "m2.jpg": None, "": "read_failed"}, name


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def test_zip_whose_central_directory_lies_about_offsets(tmp_path):
    """A member whose offset points at another member, into data, or past the end is `read_failed`, alone;
    an end record that misplaces the whole directory makes every member `read_failed` (no crash, no hang)."""
    data = zip_bytes([(f"m{i}.jpg", JPEG, 0) for i in range(3)])
    directory = data.find(b"PK\x01\x02")
    second = data.find(b"PK\x01\x02", directory + 4)  # m1's central directory entry
    third_local = data.find(b"PK\x03\x04", 4 + struct.unpack_from("<I", data, second + 42)[0])
    for lie in (third_local, 7, len(data) + 1000, 0xFFFFFFF0):
        damaged = bytearray(data)
        struct.pack_into("<I", damaged, second + 42, lie)
        (tmp_path / "lie.zip").write_bytes(damaged)
        assert errors_by_member(archive_rows(str(tmp_path / "lie.zip"))) == {"m0.jpg": None, "m1.jpg": "read_failed", "m2.jpg": None}
    end = data.rfind(b"PK\x05\x06")
    for lie in (0, len(data) * 3, 0xFFFFFFFF):
        damaged = bytearray(data)
        struct.pack_into("<I", damaged, end + 16, lie)  # the end record's "central directory starts here"
        (tmp_path / "lie.zip").write_bytes(damaged)
        assert errors_by_member(archive_rows(str(tmp_path / "lie.zip"))) == {f"m{i}.jpg": "read_failed" for i in range(3)}


def test_a_name_held_twice_gets_one_row(tmp_path):
    """`tar -r` appends a newer copy under the same name; a forged zip can repeat a name 1,000 times."""
    (tmp_path / "twice.tar").write_bytes(tar_bytes([(tar_member("a.jpg"), JPEG), (tar_member("b.jpg"), JPEG), (tar_member("a.jpg"), b"new")]))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        for _ in range(1000):
            archive.writestr("same.jpg", JPEG)
    (tmp_path / "twice.zip").write_bytes(buffer.getvalue())
    tar_rows = archive_rows(str(tmp_path / "twice.tar"))
    assert errors_by_member(tar_rows) == {"a.jpg": None, "b.jpg": None}
    assert tar_rows[0]["bytes"] == JPEG  # the first copy: a stream cannot know a later one is coming
    assert errors_by_member(archive_rows(str(tmp_path / "twice.zip"))) == {"same.jpg": None}


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_of_100000_empty_members(tmp_path, kind):
    """Every member gets its row (an empty member: `empty` once decoded), in blocks of at most BLOCK_MEMBERS.
    Halfway through a tar no more than a block's worth of its headers is alive: tarfile alone keeps every
    header it read (~45 MB here). A zip's central directory is read whole (~0.6 KB a member): zipfile's way."""
    import gc

    n = 100_000
    path = tmp_path / f"many.{kind}"
    if kind == "tar":
        path.write_bytes(tar_bytes([(tar_member(f"e{i:06d}.jpg"), b"") for i in range(n)]))
    else:
        with zipfile.ZipFile(path, "w") as archive:
            for i in range(n):
                archive.writestr(f"e{i:06d}.jpg", b"")
    started = time.monotonic()
    rows, blocks, alive = [], 0, None
    for block in inputs.read_archive({"path": [str(path)], "source": [str(path).encode()]}, 64 << 20, NO_DONE):
        assert block.num_rows <= inputs.BLOCK_MEMBERS and set(block["bytes"].to_pylist()) == {b""}
        rows += block["path"].to_pylist()
        blocks += 1
        if blocks == n // inputs.BLOCK_MEMBERS // 2:
            alive = sum(isinstance(o, tarfile.TarInfo) for o in gc.get_objects())
    print(f"{kind}: {len(rows)} rows in {blocks} blocks, {time.monotonic() - started:.1f} s; TarInfo alive halfway: {alive}")
    assert len(set(rows)) == len(rows) == n
    if kind == "tar":
        assert alive <= inputs.BLOCK_MEMBERS


def test_damaged_archives_never_crash_the_reader(tmp_path):
    """2,000 seeded random corruptions of zip, tar and tar.gz archives: each gives rows, with no
    exception out of the reader and no path twice. (This found the duplicate-name and negative-seek cases.)"""
    images = [synth.sample(5, i).data[:3000] for i in range(6)]
    bases = {
        "zip": zip_bytes([(f"m{i}.jpg", d, 0) for i, d in enumerate(images)]),
        "tar": tar_bytes([(tar_member(f"dir/{'x' * 120 if i == 2 else ''}m{i}.jpg"), d) for i, d in enumerate(images)]),
    }
    bases["tar.gz"] = _gzip(bases["tar"])
    rng = random.Random(11)
    for _ in range(2000):
        kind = rng.choice(sorted(bases))
        data = bytearray(bases[kind])
        for _ in range(rng.choice((1, 2, 5, 20))):
            at, roll = rng.randrange(len(data)), rng.random()
            if roll < 0.4:
                data[at] = rng.randrange(256)
            elif roll < 0.8:
                data[at : at + rng.randrange(1, 64)] = rng.randbytes(rng.randrange(64))
            else:
                del data[max(at, 1) :]
        path = tmp_path / f"fuzz.{kind}"
        path.write_bytes(data)
        rows = archive_rows(str(path))
        assert rows and len({r["path"] for r in rows}) == len(rows)


# --- oversized input and bombs (item 4), through a whole scoring job --------------------------------

GB = 1 << 30


class _Zeros:
    """`n` zero bytes as a readable stream: a 2 GB tar member written without 2 GB in memory."""

    def __init__(self, n: int):
        self.left = n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> tuple[Path, dict]:
    """Inputs that would take gigabytes if read: (folder, {path: expected error}).

    A zip member of 2 GB of zeros (~2 MB compressed), the same as a .tar.gz member (~9 MB),
    a sparse 2 GB plain file (nothing on disk), and a zip member that declares 1 KB but
    inflates to 100 MB (its data does not match its header: damaged).
    """
    root = tmp_path_factory.mktemp("bombs")
    with zipfile.ZipFile(root / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("zeros.jpg", "w", force_zip64=True) as member:
            for _ in range(128):
                member.write(bytes(16 << 20))
        archive.writestr("ok.jpg", JPEG)
    with tarfile.open(root / "bomb.tar.gz", "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("zeros.jpg")
        info.size = 2 * GB
        tar.addfile(info, _Zeros(2 * GB))
        info = tarfile.TarInfo("ok.jpg")
        info.size = len(JPEG)
        tar.addfile(info, io.BytesIO(JPEG))
    with open(root / "huge.jpg", "wb") as f:
        f.truncate(2 * GB)
    (root / "liar.zip").write_bytes(declared_smaller(zip_bytes([("liar.jpg", bytes(100 << 20), 0)]), 1024))
    expected = {
        f"{root / 'bomb.zip'}#zeros.jpg": "too_large", f"{root / 'bomb.zip'}#ok.jpg": None,
        f"{root / 'bomb.tar.gz'}#zeros.jpg": "too_large", f"{root / 'bomb.tar.gz'}#ok.jpg": None,
        str(root / "huge.jpg"): "too_large", f"{root / 'liar.zip'}#liar.jpg": "read_failed",
    }
    return root, expected


def declared_smaller(data: bytes, size: int) -> bytes:
    """A one-member zip whose local and central headers both declare `size` uncompressed bytes."""
    damaged = bytearray(data)
    struct.pack_into("<I", damaged, data.find(b"PK\x03\x04") + 22, size)
    struct.pack_into("<I", damaged, data.find(b"PK\x01\x02") + 24, size)
    return bytes(damaged)


def hostile_folder(root: Path) -> dict:
    """Every hostile archive of the tests above, in `root`; returns {path: expected error} for a scoring job."""
    root.mkdir(parents=True)
    (root / "hostile.tar").write_bytes(hostile_tar())
    (root / "hostile.zip").write_bytes(hostile_zip())
    members = [(tar_member(f"m{i}.jpg"), JPEG) for i in range(6)]
    (root / "cut.tar").write_bytes(with_bad_checksum(tar_bytes(members), 3, len(JPEG)))
    data = zip_bytes([(f"m{i}.jpg", JPEG, 0) for i in range(3)])
    second = data.find(b"PK\x01\x02", data.find(b"PK\x01\x02") + 4)
    lie = bytearray(data)
    struct.pack_into("<I", lie, second + 42, 7)
    (root / "lie.zip").write_bytes(lie)
    (root / "plain.jpg").write_bytes(JPEG)
    expected = {f"{root / 'hostile.tar'}#{m}": e for m, e in HOSTILE_TAR_ROWS.items()}
    expected |= {f"{root / 'hostile.zip'}#{m}": e for m, e in HOSTILE_ZIP_ROWS.items()}
    expected |= {f"{root / 'cut.tar'}#m{i}.jpg": None for i in range(3)} | {str(root / "cut.tar"): "read_failed"}
    expected |= {f"{root / 'lie.zip'}#m{i}.jpg": e for i, e in enumerate((None, "read_failed", None))}
    return expected | {str(root / "plain.jpg"): None}


class PeakMemory:
    """Peak resident memory of a job while it runs: its own process tree, and the Ray workers that start meanwhile.

    A process's peak comes from the kernel (VmHWM), so a spike between two polls still
    counts; the job's total is the largest sum of current RSS seen at one poll.
    """

    def __init__(self, root_pid: int, head_pid: int):
        import psutil

        self.root, self.psutil = psutil.Process(root_pid), psutil
        self.raylets = [p for p in psutil.Process(head_pid).children(recursive=True) if p.name() == "raylet"]
        self.before = {w.pid for r in self.raylets for w in r.children()}
        self.peaks: dict[int, tuple[int, str]] = {}  # pid -> (peak RSS bytes, name)
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _processes(self):
        workers = [w for r in self.raylets for w in r.children() if w.pid not in self.before]
        return [self.root, *self.root.children(recursive=True), *workers]

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            total = 0
            for process in self._processes():
                try:
                    status = Path(f"/proc/{process.pid}/status").read_text()
                    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                    rss, peak = (int(fields[k].split()[0]) << 10 for k in ("VmRSS", "VmHWM"))
                    self.peaks[process.pid] = (max(peak, self.peaks.get(process.pid, (0, ""))[0]), process.name())
                    total += rss
                except (OSError, KeyError, self.psutil.Error):
                    continue  # it exited between the listing and the read
            self.total = max(self.total, total)

    def stop(self) -> tuple[dict[str, int], str]:
        """({process name: largest peak among processes of that name}, a summary line)."""
        self._stop.set()
        self._thread.join()
        by_name: dict[str, int] = {}
        for peak, name in self.peaks.values():
            by_name[name] = max(peak, by_name.get(name, 0))
        top = sorted(by_name.items(), key=lambda item: -item[1])
        summary = f"total {self.total / 1e6:.0f} MB; largest: " + ", ".join(f"{n} {b / 1e6:.0f} MB" for n, b in top[:4])
        return by_name, summary


def test_bombs_and_hostile_archives_in_one_scoring_job(ray_session, model_file, bombs, tmp_path):
    """One scoring job over the bombs and every hostile archive: the documented row for each input, nothing
    written outside --output (a `../../x.jpg` member would land in the sandbox), and no process of the job,
    workers included, reaches 1 GB (a model replica 1.5 GB: TensorFlow and the model alone take ~1.06 GB)."""
    bomb_root, expected = bombs
    sandbox = tmp_path / "sandbox"
    expected = expected | hostile_folder(sandbox / "in")
    workdir = sandbox / "work" / "deep"
    workdir.mkdir(parents=True)
    before = sorted(sandbox.rglob("*")) + sorted(bomb_root.rglob("*"))
    # Batches of 8: a replica's activations for 64 images (~0.6 GB a call, two calls at a time) would
    # outweigh anything an input could add; the bound is then about the input, not the model.
    args = ["score", "--model", str(model_file), "--input", str(sandbox / "in"), "--input", str(bomb_root),
            "--output", str(sandbox / "out"), "--batch-size", "8"]
    started = time.monotonic()
    job = subprocess.Popen([sys.executable, "-m", "happysad.cli", *args], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = PeakMemory(job.pid, ray_session["pid"])
    try:
        output, _ = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
        peaks, summary = memory.stop()
    print(f"bombs + hostile archives: {time.monotonic() - started:.0f} s; peak RSS {summary}")
    assert job.returncode == 0, output[-3000:]
    rows = read_rows(str(sandbox / "out"))
    assert len(rows) == len({r["path"] for r in rows}) == len(expected)
    assert {r["path"]: r["error"] for r in rows} == expected
    assert all((r["score"] is None) == (r["error"] is not None) for r in rows)
    out = sandbox / "out"
    assert [p for p in sorted(sandbox.rglob("*")) if out not in p.parents and p != out] + sorted(bomb_root.rglob("*")) == before
    assert not Path("/etc/x.jpg").exists() and not (workdir / "../../x.jpg").exists()
    # A model replica holds TensorFlow and the model: ~1.06 GB here scoring one plain image at batch 8.
    # Reading any of the 2 GB inputs would put it, or the archive reader, past 3 GB.
    for name, peak in peaks.items():
        assert peak < (1.5 * GB if "Replica" in name else GB), summary


# --- untrusted models (item 6) ------------------------------------------------------------------


@pytest.mark.parametrize("content", ["truncated", "not_a_zip"])
def test_predict_refuses_a_damaged_model_file(model_file, tmp_path, content):
    bad = tmp_path / "model.keras"
    bad.write_bytes(model_file.read_bytes()[:5000] if content == "truncated" else b"just text, not a zip")
    (tmp_path / "face.jpg").write_bytes(JPEG)
    result = run_cli("predict", "--model", str(bad), str(tmp_path / "face.jpg"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"happysad predict: error: --model {bad}: not a readable .keras model file (BadZipFile)"]
    assert result.stdout == ""


# --- S3 faults (item 1): every job through a proxy that fails a seeded share of requests ----------------


@pytest.fixture(scope="module")
def s3_data(s3, model_file, tiny_shards, tmp_path_factory) -> dict:
    """On the S3 server: a prefix of images (one of 2 MB), a zip, the model, WebDataset shards and class folders."""
    from conftest import BUCKET, upload_tree

    root = tmp_path_factory.mktemp("s3data")
    (root / "folder").mkdir()
    for i in range(12):
        sample = synth.sample(31, i)
        (root / "folder" / f"{i:02d}.{sample.extension}").write_bytes(sample.data)
    (root / "folder" / "notes.txt").write_bytes(b"not an image")
    (root / "folder" / "big.jpg").write_bytes(JPEG + bytes(2 << 20))  # over --max-file-mb 1: never read
    (root / "batch.zip").write_bytes(zip_bytes([(f"z{i}.jpg", synth.sample(32, i).data, 0) for i in range(6)]))
    s3.upload_file(str(root / "batch.zip"), BUCKET, "faults/in/batch.zip")
    s3.upload_file(str(model_file), BUCKET, "faults/model.keras")
    return {
        "folder": upload_tree(s3, root / "folder", "faults/in/folder"),
        "zip": f"s3://{BUCKET}/faults/in/batch.zip",
        "model": f"s3://{BUCKET}/faults/model.keras",
        "shards": upload_tree(s3, tiny_shards, "faults/shards"),
        "faces": upload_tree(s3, synth.make_data(root / "faces", n=6, seed=5), "faults/faces"),
        "out": f"s3://{BUCKET}/faults/out",
    }


def timed_cli(*args: str, endpoint: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI with S3 at `endpoint`; (result, seconds). Workers get the endpoint through the job, not the raylet."""
    started = time.monotonic()
    result = run_cli(*args, env=dict(os.environ, AWS_ENDPOINT_URL=endpoint), timeout=timeout)
    return result, time.monotonic() - started


def s3_keys(s3, prefix: str) -> list[str]:
    from conftest import BUCKET

    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.mark.slow
def test_scoring_through_10_percent_s3_faults_gives_the_fault_free_rows(ray_session, s3_server, fault_proxy, s3_data):
    """An s3:// prefix and an s3:// zip, the model and the output on S3: with 1 request in 10 answered 503, 500,
    reset or 2 s late, the rows equal a fault-free run's. The workers went through the proxy too (it saw the
    image reads, which only workers make), and the 2 MB object over --max-file-mb was never read."""
    args = ["score", "--model", s3_data["model"], "--input", s3_data["folder"], "--input", s3_data["zip"], "--max-file-mb", "1"]
    clean, clean_s = timed_cli(*args, "--output", f"{s3_data['out']}/clean", endpoint=s3_server)
    assert clean.returncode == 0, clean.stderr[-3000:]
    with fault_proxy.faults(0.1, seed=7) as proxy:
        faulty, faulty_s = timed_cli(*args, "--output", f"{s3_data['out']}/faulty", endpoint=proxy.endpoint)
    print(f"scoring: fault-free {clean_s:.0f} s, faulty {faulty_s:.0f} s; {len(proxy.requests)} requests, injected {dict(proxy.injected)}")
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    expected = sorted(read_rows(f"{s3_data['out']}/clean"), key=lambda r: r["path"])
    assert sorted(read_rows(f"{s3_data['out']}/faulty"), key=lambda r: r["path"]) == expected
    assert len(expected) == 14 + 6 and {r["path"].rsplit("/", 1)[1]: r["error"] for r in expected}["big.jpg"] == "too_large"
    assert sum(n for kind, n in proxy.injected.items() if kind != "slow") >= 3
    reads = {path for method, path in proxy.requests if method == "GET"}
    assert "/happysad-test/faults/in/folder/00.png" in reads or "/happysad-test/faults/in/folder/00.jpg" in reads
    assert "/happysad-test/faults/in/folder/big.jpg" not in reads


@pytest.mark.slow
def test_training_through_10_percent_s3_faults_matches_the_fault_free_run(ray_session, s3_server, fault_proxy, s3_data):
    """Shards and class folders on S3, run directory (checkpoints included) on S3, one epoch: the test metrics
    equal a fault-free run's. The class folders' files are read by Ray tasks only: the proxy seeing them read
    shows the job passed its endpoint on to the workers."""
    args = ["train", "--data", s3_data["shards"], "--data", s3_data["faces"], "--epochs", "1", "--batch-size", "8"]
    clean, clean_s = timed_cli(*args, "--output", f"{s3_data['out']}/run-clean", endpoint=s3_server)
    assert clean.returncode == 0, clean.stderr[-3000:]
    with fault_proxy.faults(0.1, seed=8) as proxy:
        faulty, faulty_s = timed_cli(*args, "--output", f"{s3_data['out']}/run-faulty", endpoint=proxy.endpoint)
    print(f"training: fault-free {clean_s:.0f} s, faulty {faulty_s:.0f} s; {len(proxy.requests)} requests, injected {dict(proxy.injected)}")
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    metrics = [json.loads(storage.read_bytes(f"{s3_data['out']}/{run}/metrics.json")) for run in ("run-clean", "run-faulty")]
    assert metrics[0]["test"]["n"] == metrics[1]["test"]["n"] > 0
    for name in ("accuracy", "loss", "auc", "precision", "recall"):
        clean_value, faulty_value = (m["test"][name] for m in metrics)
        assert (clean_value is None and faulty_value is None) or faulty_value == pytest.approx(clean_value, abs=1e-4), name
    assert metrics[0]["skipped"] == metrics[1]["skipped"] and metrics[0]["counts"] == metrics[1]["counts"]
    assert sum(n for kind, n in proxy.injected.items() if kind != "slow") >= 3
    assert any(method == "GET" and "/faults/faces/happy/" in path for method, path in proxy.requests)


def test_small_reads_survive_s3_error_answers(s3, s3_server, fault_proxy, monkeypatch):
    """The AWS SDK files a 503 or 500 answer to a read smaller than the answer's XML body as a final error
    (INTERNAL_FAILURE, never retried): a 12-byte object failed 11 reads in 40 at 30% faults. Now every read
    of it survives."""
    from conftest import BUCKET

    s3.put_object(Bucket=BUCKET, Key="faults/tiny.txt", Body=b"not an image")
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    with fault_proxy.faults(0.3, seed=3, kinds=("503", "500")) as proxy:
        for _ in range(20):
            with storage.open_source(f"s3://{BUCKET}/faults/tiny.txt".encode()) as stream:
                assert stream.read(100) == b"not an image"
            assert storage.read_bytes(f"s3://{BUCKET}/faults/tiny.txt") == b"not an image"
    assert proxy.injected["503"] + proxy.injected["500"] >= 10


def test_a_lock_put_whose_answer_was_lost_is_still_ours(s3, fault_proxy, monkeypatch):
    """The output lock's conditional PUT is stored but its answer lost: the retry gets 412 and finds the
    lock holding its own record. The run goes on (it is not refused by itself) and releases the lock."""
    from conftest import BUCKET

    from happysad import lock

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(var, fault_proxy.endpoint)
    key = "faults/lost-answer/.lock"
    lost_before = fault_proxy.injected["lost"]
    fault_proxy.lose_answer_once("PUT", f"/{BUCKET}/{key}")
    with lock.held(f"s3://{BUCKET}/{key}", "--output", f"s3://{BUCKET}/faults/lost-answer"):
        assert json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())["pid"] == os.getpid()
    assert fault_proxy.injected["lost"] == lost_before + 1
    assert key not in s3_keys(s3, "faults/lost-answer/")  # released


def test_unreachable_s3_fails_each_job_in_bounded_time_with_one_line(ray_session, s3, fault_proxy, s3_data, model_file):
    """Every S3 request fails (503, 500 or reset): each job exits non-zero within 90 s (6 attempts with backoff),
    with one line naming the URI, and writes nothing to --output."""
    from faultproxy import ERRORS

    from happysad.storage import S3_MAX_ATTEMPTS

    jobs = {
        "score": (["score", "--model", str(model_file), "--input", s3_data["folder"], "--output", f"{s3_data['out']}/dead-scores"], s3_data["folder"]),
        "train": (["train", "--data", s3_data["shards"], "--output", f"{s3_data['out']}/dead-run", "--epochs", "1"], f"{s3_data['out']}/dead-run"),
    }
    for job, (args, uri) in jobs.items():
        with fault_proxy.faults(1.0, seed=9, kinds=ERRORS) as proxy:
            result, seconds = timed_cli(*args, endpoint=proxy.endpoint, timeout=300)
        print(f"{job} with S3 unreachable: exit {result.returncode} after {seconds:.0f} s, {len(proxy.requests)} requests")
        assert result.returncode != 0 and seconds < 90
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and uri in result.stderr, result.stderr
        assert result.stderr.startswith(f"happysad {job}: error: ")
        assert len(proxy.requests) >= S3_MAX_ATTEMPTS  # retried, as configured, before giving up
    assert s3_keys(s3, "faults/out/dead-") == []


# --- a node lost while scoring (item 2) ---------------------------------------------------------------


def replica_nodes() -> set[str]:
    """Node ids of the live scoring replicas."""
    import ray.util.state as state

    actors = state.list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, detail=True, raise_on_missing_output=False)
    return {a.node_id for a in actors if "MapBatches(Replica)" in a.class_name}


def kill_raylet(node: subprocess.Popen) -> int:
    """SIGKILL the raylet that `ray start` (the `node` process) runs; its pid."""
    import psutil

    (raylet,) = [p for p in psutil.Process(node.pid).children(recursive=True) if p.name() == "raylet"]
    raylet.kill()
    return raylet.pid


@pytest.mark.slow
def test_a_node_lost_while_scoring_5000_images_loses_no_row(ray_session, model_file, tmp_path):
    """Two nodes, a replica on each; the second node's raylet is SIGKILLed mid-run. The replica it held starts
    again on the head, the batches it held are scored again, and the job ends with one row per input."""
    import ray

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5000):
        sample = synth.sample(12, i % 50)
        (folder / f"{i:04d}.{sample.extension}").write_bytes(sample.data)
    output = tmp_path / "scores"
    args = ["score", "--model", str(model_file), "--input", str(folder), "--output", str(output), "--concurrency", "2",
            "--batch-size", "16", "--rows-per-file", "128"]
    with joined_node(ray_session, cpus=2, name="doomed_node") as node:
        doomed = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("doomed_node"))
        started = time.monotonic()
        job = subprocess.Popen([sys.executable, "-m", "happysad.cli", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline, ready = time.monotonic() + 300, False
            while job.poll() is None and time.monotonic() < deadline and not ready:
                time.sleep(0.5)
                ready = doomed in replica_nodes() and len(list(output.glob(".staging-*/*.parquet"))) >= 2
            assert ready and job.poll() is None, "no replica on the second node while the job ran"
            staged = len(list(output.glob(".staging-*/*.parquet")))
            kill_raylet(node)
            killed_at = time.monotonic() - started
            log, _ = job.communicate(timeout=500)
        finally:
            if job.poll() is None:
                job.kill()
    seconds = time.monotonic() - started
    print(f"node lost while scoring: killed at {killed_at:.0f} s with {staged} files staged; finished in {seconds:.0f} s")
    assert job.returncode == 0, "\n".join(line for line in log.splitlines() if "Error" in line or "error" in line)[-3000:]
    paths = [r["path"] for r in read_rows(str(output))]
    print(f"rows {len(paths)}, unique {len(set(paths))}")
    assert len(paths) == len(set(paths)) == 5000
    assert set(paths) == {str(p) for p in folder.iterdir()}


# --- a node lost while training (item 3) ---------------------------------------------------------------


def train_worker_nodes(dashboard: str, run_name: str) -> dict[int, str]:
    """{world rank: node id} of the newest attempt of the Train run `run_name` (Ray Train's state API:
    the job needs RAY_TRAIN_ENABLE_STATE_TRACKING=1)."""
    import urllib.request

    with urllib.request.urlopen(f"{dashboard}/api/train/v2/runs/v1", timeout=30) as response:
        runs = [r for r in json.load(response)["train_runs"] if r["name"] == run_name]
    workers = max(runs, key=lambda r: r["start_time_ns"])["attempts"][-1]["workers"]
    return {w["world_rank"]: w["node_id"] for w in workers}


def epoch_printers(log: str) -> dict[int, set[str]]:
    """{epoch: pids of the Train workers that printed it}: rank 0 prints each epoch it trains. The log of a
    `--verbose` job: only there does a relayed line keep Ray's prefix, which names the worker's pid."""
    import re

    printed: dict[int, set[str]] = {}
    for pid, epoch in re.findall(r"RayTrainWorker pid=(\d+)\S*\s+(?:\[happysad\] )?worker \d+: epoch (\d+)/", log):
        printed.setdefault(int(epoch), set()).add(pid)
    return printed


def start_training(args: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_TRAIN_ENABLE_STATE_TRACKING="1", PYTHONUNBUFFERED="1", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20")
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "happysad.cli", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def node_id_with(resource: str) -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource))


@pytest.fixture
def data_with_huge_file(tiny_folders, tmp_path) -> Path:
    """The 24 tiny faces plus a sparse 2 GB happy/huge.jpg: training counts it as `too_large`, never reading it."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_folders, data)
    with open(data / "happy" / "huge.jpg", "wb") as f:
        f.truncate(2 * GB)
    return data


EPOCHS = 8


@pytest.mark.slow
def test_training_continues_from_its_checkpoint_when_a_node_is_lost(ray_session, data_with_huge_file, tmp_path):
    """2 workers, one per node, on 3 nodes, 8 epochs. After the first checkpoint the node of worker 1 (of worker 0 when
    worker 1 is on the head, which the test cannot kill) is SIGKILLed: Ray Train restarts the group on the
    2 nodes left, from that checkpoint (epoch 1 is not trained again), and the run completes."""
    output, log_path = tmp_path / "run", tmp_path / "train.log"
    args = ["train", "--data", str(data_with_huge_file), "--output", str(output), "--workers", "2", "--one-per-node",
            "--epochs", str(EPOCHS), "--batch-size", "8", "--verbose"]
    with joined_node(ray_session, cpus=2, name="node_b") as node_b, joined_node(ray_session, cpus=2, name="node_c") as node_c:
        killable = {node_id_with("node_b"): node_b, node_id_with("node_c"): node_c}
        started = time.monotonic()
        job = start_training(args, log_path)
        try:
            wait_for_registered_checkpoint(output, job, log_path)
            ranks = train_worker_nodes(ray_session["dashboard"], output.name)
            victim = 1 if ranks[1] in killable else 0
            kill_raylet(killable[ranks[victim]])
            killed_at = time.monotonic() - started
            returncode = job.wait(timeout=500)
        finally:
            if job.poll() is None:
                job.kill()
    log = log_path.read_text()
    print(f"training, node of worker {victim} lost at {killed_at:.0f} s: exit {returncode} after {time.monotonic() - started:.0f} s")
    assert returncode == 0, log[-3000:]
    printed = epoch_printers(log)
    # Epoch 1 is trained once, by the first group; a new group trains the last epoch. (Epochs are ~1 s: the
    # first group trains a few more before the kill lands, and the one without a checkpoint is trained again.)
    assert len(printed[1]) == 1 and printed[EPOCHS] - printed[1], printed
    history = (output / "history.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in history] == [str(e) for e in range(1, EPOCHS + 1)]
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["epochs"] == EPOCHS and metrics["skipped"] == {"too_large": 1}


@pytest.mark.slow
def test_training_that_cannot_continue_fails_clearly_and_resume_completes_it(ray_session, tiny_folders, tmp_path):
    """2 workers, one per node, on 2 nodes: the second is SIGKILLed after the first checkpoint and no node is
    left for worker 1. The job must fail within a bounded time with one line naming --resume; `--resume`
    (without --one-per-node, once a node is back) then completes the run from the checkpoint."""
    output, log_path = tmp_path / "run", tmp_path / "train.log"
    args = ["train", "--data", str(tiny_folders), "--output", str(output), "--workers", "2", "--epochs", "2", "--batch-size", "8"]
    with joined_node(ray_session, cpus=2, name="node_b") as node_b:
        job = start_training([*args, "--one-per-node", "--max-failures", "1"], log_path)
        try:
            wait_for_registered_checkpoint(output, job, log_path)
            kill_raylet(node_b)
            killed = time.monotonic()
            returncode = job.wait(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
    log = log_path.read_text()
    print(f"training with no node left: exit {returncode} {time.monotonic() - killed:.0f} s after the kill")
    # Ray relays the dying workers' and the controller's own tracebacks, tagged "(RayTrainWorker pid=...)";
    # the job itself ends on one line, not a traceback.
    assert returncode == 1 and not any(line.startswith("Traceback") for line in log.splitlines())
    assert log.strip().splitlines()[-1].startswith("happysad train: error:") and "--resume" in log.strip().splitlines()[-1]
    with joined_node(ray_session, cpus=2, name="node_c"):
        resumed = run_cli(*args, "--resume", timeout=500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row.split(",")[0] for row in (output / "history.csv").read_text().splitlines()[1:]] == ["1", "2"]
