"""Scoring inputs without Ray: listing, names, de-duplication, damaged and hostile archives."""

import io
import os
import tarfile
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import BUCKET
from happysad import inputs, storage, synth
from happysad.storage import UsageError

JPEG = next(s.data for s in (synth.sample(5, i) for i in range(10)) if s.extension == "jpg")
NO_DONE = np.empty(0, np.uint64)


def archive_rows(uri: str, max_bytes: int = 64 << 20, done=NO_DONE) -> list[dict]:
    """The rows scoring gets for an archive: its reader's blocks, with members read by reference filled in."""
    rows = []
    for block in inputs.read_archive({"path": [uri], "source": [uri.encode()]}, max_bytes, done):
        read = inputs.read_files(block.to_pydict(), max_bytes)
        rows += [dict(zip(read, values)) for values in zip(*read.values())]
    return rows


def errors_by_path(rows: list[dict]) -> dict:
    return {r["path"]: r["error"] for r in rows}


def test_non_utf8_names_are_listed_losslessly(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/bad\xff%name.jpg"
    with open(raw, "wb") as f:
        f.write(JPEG)
    found = inputs.expand([str(tmp_path)])
    (path,) = found.files["path"].to_pylist()
    assert path == f"{tmp_path}/bad%FF%25name.jpg"
    assert urllib.parse.unquote_to_bytes(path) == raw
    rows = inputs.read_files(found.files.to_pydict(), 1 << 20)
    assert rows["bytes"] == [JPEG] and rows["error"] == [None]


def test_overlapping_and_relative_inputs_give_each_file_once(tmp_path, monkeypatch):
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.jpg", "sub/c.jpg"):
        (tmp_path / "photos" / name).write_bytes(JPEG)
    monkeypatch.chdir(tmp_path)
    found = inputs.expand(["photos", str(tmp_path / "photos" / "sub"), "photos/sub/b.jpg", "./photos/"])
    assert found.files["path"].to_pylist() == [str(tmp_path / "photos" / n) for n in ("a.jpg", "sub/b.jpg", "sub/c.jpg")]


def test_hidden_files_are_counted_and_the_output_folder_is_never_an_input(tmp_path):
    (tmp_path / "in" / ".cache").mkdir(parents=True)
    (tmp_path / "in" / "a.jpg").write_bytes(JPEG)
    (tmp_path / "in" / "_b.jpg").write_bytes(JPEG)
    (tmp_path / "in" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "in" / ".cache" / "t.jpg").write_bytes(JPEG)
    (tmp_path / "in" / "scores").mkdir()
    (tmp_path / "in" / "scores" / "part-0.parquet").write_bytes(b"PAR1")
    found = inputs.expand([str(tmp_path / "in")], output=str(tmp_path / "in" / "scores"))
    assert [Path(p).name for p in found.files["path"].to_pylist()] == ["_b.jpg", "a.jpg"]
    assert found.hidden == 2


def test_files_over_the_limit_and_non_files_get_rows_without_being_opened(tmp_path):
    (tmp_path / "big.jpg").write_bytes(JPEG + b"\0" * 2048)
    (tmp_path / "ok.jpg").write_bytes(JPEG)
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would block forever
    os.symlink(tmp_path / "missing.jpg", tmp_path / "dangling.jpg")
    found = inputs.expand([str(tmp_path)])
    rows = inputs.read_files(found.files.to_pydict(), max_bytes=len(JPEG) + 1)
    assert dict(zip([Path(p).name for p in rows["path"]], rows["error"])) == {
        "big.jpg": "too_large", "dangling.jpg": "read_failed", "ok.jpg": None, "pipe.jpg": "read_failed"
    }


def test_missing_input_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=f"--input {tmp_path}/nope: no such"):
        inputs.expand([str(tmp_path / "nope")])


def zip_with(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_damaged_zip_members_get_their_own_rows(tmp_path):
    data = bytearray(zip_with({"good.jpg": JPEG, "corrupt.jpg": JPEG, "locked.jpg": JPEG, "after.jpg": JPEG}))
    corrupt = data.find(b"corrupt.jpg") + len("corrupt.jpg") + 20
    data[corrupt : corrupt + 200] = bytes(200)  # deflate stream garbage: zlib.error
    for start in (0, data.find(b"PK\x01\x02")):  # flag the member encrypted in its local and central headers
        header = data.find(b"locked.jpg", start) - (30 if start == 0 else 46)
        flags_at = header + (6 if start == 0 else 8)
        data[flags_at] |= 1
    path = tmp_path / "damaged.zip"
    path.write_bytes(bytes(data))
    rows = errors_by_path(archive_rows(str(path)))
    assert rows == {f"{path}#good.jpg": None, f"{path}#corrupt.jpg": "read_failed", f"{path}#locked.jpg": "read_failed", f"{path}#after.jpg": None}


def test_tar_member_names_that_are_not_utf8_and_links(tmp_path):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("caf\udce9.jpg")  # a Latin-1 byte, as tarfile reads it from disk
        info.size = len(JPEG)
        tar.addfile(info, io.BytesIO(JPEG))
        for kind, name in ((tarfile.SYMTYPE, "link.jpg"), (tarfile.LNKTYPE, "hard.jpg"), (tarfile.CHRTYPE, "dev.jpg")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "../../etc/passwd"
            tar.addfile(info)
        info = tarfile.TarInfo("../../escape.jpg")
        info.size = len(JPEG)
        tar.addfile(info, io.BytesIO(JPEG))
    rows = archive_rows(str(path))
    assert errors_by_path(rows) == {
        f"{path}#caf%E9.jpg": None, f"{path}#link.jpg": "unsupported", f"{path}#hard.jpg": "unsupported",
        f"{path}#dev.jpg": "unsupported", f"{path}#../../escape.jpg": None,
    }
    assert not (tmp_path.parent.parent / "escape.jpg").exists()


def test_empty_truncated_and_garbage_archives(tmp_path):
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    (tmp_path / "garbage.tar.gz").write_bytes(b"not a gzip at all")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("one.jpg", "two.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(JPEG)
            tar.addfile(info, io.BytesIO(JPEG))
    (tmp_path / "cut.tar").write_bytes(buffer.getvalue()[: 512 + len(JPEG) + 512 + 100])  # inside two.jpg's data
    assert errors_by_path(archive_rows(str(tmp_path / "empty.tar"))) == {str(tmp_path / "empty.tar"): "empty"}
    assert errors_by_path(archive_rows(str(tmp_path / "garbage.tar.gz"))) == {str(tmp_path / "garbage.tar.gz"): "read_failed"}
    cut = str(tmp_path / "cut.tar")
    assert errors_by_path(archive_rows(cut)) == {f"{cut}#one.jpg": None, f"{cut}#two.jpg": "read_failed"}


def test_zip_bomb_member_is_too_large_without_inflating(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("zeros.jpg", "w", force_zip64=True) as member:
            chunk = bytes(1 << 20)
            for _ in range(256):  # 256 MB of zeros, about 250 KB compressed
                member.write(chunk)
        archive.writestr("ok.jpg", JPEG)
    rows = errors_by_path(archive_rows(str(path), max_bytes=1 << 20))
    assert rows == {f"{path}#zeros.jpg": "too_large", f"{path}#ok.jpg": None}


def test_archive_is_streamed_in_bounded_blocks_and_done_members_skipped(tmp_path):
    path = tmp_path / "many.tar"
    names = [f"m{i:04d}.jpg" for i in range(inputs.BLOCK_MEMBERS * 2 + 5)]
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(JPEG)
            tar.addfile(info, io.BytesIO(JPEG))
    blocks = list(inputs.read_archive({"path": [str(path)], "source": [str(path).encode()]}, 64 << 20, NO_DONE))
    assert max(b.num_rows for b in blocks) <= inputs.BLOCK_MEMBERS and len(blocks) >= 3
    done = np.sort(inputs.path_hashes([f"{path}#{n}" for n in names[:-3]]))
    assert [r["path"] for r in archive_rows(str(path), done=done)] == [f"{path}#{n}" for n in names[-3:]]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_plain_tar_is_sent_on_as_offsets_and_read_where_it_is_decoded(tmp_path, s3, where):
    """The reader of a plain tar sends on (offset, size) rows, no image bytes: what it holds and sends does
    not grow with the members. `read_files` then reads each member, neighbours in one ranged read (of at most
    SPAN_BYTES: the 17 MB member is read on its own)."""
    rng = np.random.default_rng(3)
    members = {f"m{i}.jpg": rng.bytes(size) for i, size in enumerate([0, 1, 700, 100_000, 3 << 20, 17 << 20, 5_000])}
    path = tmp_path / "photos.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    uri = str(path)
    if where == "s3":
        s3.upload_file(uri, BUCKET, "refs/photos.tar")
        uri = f"s3://{BUCKET}/refs/photos.tar"
    (block,) = inputs.read_archive({"path": [uri], "source": [uri.encode()]}, 64 << 20, NO_DONE)
    assert block["bytes"].to_pylist() == [b""] * len(members) and min(block["offset"].to_pylist()) >= 512
    assert block["size"].to_pylist() == [len(d) for d in members.values()]
    read = inputs.read_files(block.to_pydict(), 64 << 20)
    assert read["error"] == [None] * len(members)
    assert dict(zip(read["path"], read["bytes"])) == {f"{uri}#{name}": data for name, data in members.items()}


def test_a_compressed_tar_carries_its_members(tmp_path):
    path = tmp_path / "photos.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("one.jpg")
        info.size = len(JPEG)
        tar.addfile(info, io.BytesIO(JPEG))
    (block,) = inputs.read_archive({"path": [str(path)], "source": [str(path).encode()]}, 64 << 20, NO_DONE)
    assert block["bytes"].to_pylist() == [JPEG] and block["offset"].to_pylist() == [inputs.WHOLE]


def test_a_compressed_tar_streams_in_capped_blocks_and_other_jobs_keep_ray_defaults(ray_session, tmp_path):
    """A tar.gz's members travel through the object store: its job caps what may be in flight there
    (blocks of BLOCK_BYTES, IN_FLIGHT_PER_CPU per CPU, at least the floor). A job without one keeps Ray's defaults."""
    import ray

    from happysad import score

    defaults = ray.data.DataContext.get_current()
    default_block, default_store = defaults.target_max_block_size, defaults.execution_options.resource_limits.object_store_memory
    config = score.ScoreConfig(inputs=("x",), output=str(tmp_path / "out"))
    model = score.Model("m.keras", "0" * 16, 0.5)
    for name, capped in (("photos.tar.gz", True), ("photos.tar", False)):
        path = tmp_path / name
        with tarfile.open(path, "w:gz" if capped else "w") as tar:
            info = tarfile.TarInfo("one.jpg")
            info.size = len(JPEG)
            tar.addfile(info, io.BytesIO(JPEG))
        found = inputs.Inputs(inputs.ROW_SCHEMA.empty_table(), [storage.Listed(str(path), str(path).encode(), path.stat().st_size)], 0)
        context = score.build_pipeline(config, model, found, NO_DONE).context
        limit = max(score.IN_FLIGHT_FLOOR, ray.cluster_resources()["CPU"] * score.IN_FLIGHT_PER_CPU)
        if capped:
            assert (context.target_max_block_size, context.execution_options.resource_limits.object_store_memory) == (inputs.BLOCK_BYTES, limit)
        else:
            assert (context.target_max_block_size, context.execution_options.resource_limits.object_store_memory) == (default_block, default_store)
    after = ray.data.DataContext.get_current()  # the driver's own context is left as it was
    assert (after.target_max_block_size, after.execution_options.resource_limits.object_store_memory) == (default_block, default_store)
