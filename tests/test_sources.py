"""sources and storage on local disk and on a real S3-protocol server; the hash split."""

import io
import os
import shutil
import tarfile

import pyarrow as pa
import pytest

from conftest import BUCKET, run_cli, upload_tree
from happysad import sources, storage, synth
from happysad.decode import header_size, sniff_format
from happysad.split import split_of
from happysad.storage import UsageError


def rows_of(uris: list[str]) -> list[dict]:
    listing = sources.list_labelled(uris)
    assert listing.skipped == {}
    return sources.labelled_images(listing).take_all()


def rows_by_key(uri: str) -> dict:
    """{path relative to the root URI: (bytes, label)}: comparable across local and S3."""
    return {r["path"][len(uri):].lstrip("/"): (r["bytes"], r["label"]) for r in rows_of([uri])}


def test_class_folders_give_path_bytes_label(ray_session, tiny_folders):
    rows = rows_of([str(tiny_folders)])
    assert len(rows) == 24
    for row in rows:
        assert row["label"] in ("happy", "sad")
        assert f"/{row['label']}/" in row["path"]
        with open(row["path"], "rb") as f:
            assert f.read() == row["bytes"]


def test_every_file_is_a_row_or_counted(ray_session, tiny_folders, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_folders, root)
    nested = root / "happy" / "more" / "deeper"
    nested.mkdir(parents=True)
    face = next((root / "happy").glob("*.jpg"))
    shutil.copy(face, nested / "copy.JPG")
    shutil.copy(face, root / "happy" / "_IMG_0001.jpg")  # Ray's own listing drops names starting with _
    (root / "happy" / "_export").mkdir()
    shutil.copy(face, root / "happy" / "_export" / "b.jpg")
    with open(os.fsencode(str(root / "sad")) + b"/caf\xe9.jpg", "wb") as f:  # not UTF-8
        f.write(face.read_bytes())
    (root / "happy" / ".DS_Store").write_bytes(b"junk")
    (root / "sad" / ".cache").mkdir()
    (root / "sad" / ".cache" / "thumb.jpg").write_bytes(b"junk")
    (nested / ".hidden.jpg").write_bytes(b"junk")
    (root / "README.txt").write_text("not in a class folder")
    listing = sources.list_labelled([str(root)])
    rows, skipped = sources.labelled_images(listing).take_all(), listing.skipped
    paths = {r["path"]: r for r in rows}
    assert len(rows) == 24 + 4 and skipped == {"hidden": 3, "no_label": 1}
    for name in (nested / "copy.JPG", root / "happy" / "_IMG_0001.jpg", root / "happy" / "_export" / "b.jpg"):
        assert paths[str(name)]["label"] == "happy" and paths[str(name)]["bytes"] == face.read_bytes()
    assert paths[f"{root}/sad/caf%E9.jpg"]["label"] == "sad"
    assert all(r["error"] is None for r in rows)
    assert not any("/." in p for p in paths)


def test_empty_class_folders_are_a_usage_error(ray_session, tmp_path):
    (tmp_path / "happy").mkdir()
    (tmp_path / "sad").mkdir()
    result = run_cli("train", "--data", str(tmp_path), "--epochs", "1")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"--data {tmp_path}: no files under happy/ or sad/" in result.stderr


def test_webdataset_suffixes_match_in_any_case(ray_session, tmp_path):
    face = synth.sample(3, 0)
    with tarfile.open(tmp_path / "upper.tar", "w") as tar:
        for name, data in (("k1.JPG", face.data), ("k1.CLS", face.label.encode()), ("k2.Png", face.data), ("k2.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = sorted(rows_of([str(tmp_path)]), key=lambda r: r["path"])
    assert [r["path"].split("#")[1] for r in rows] == ["k1.JPG", "k2.Png"]
    assert [r["label"] for r in rows] == [face.label, "sad"] and all(r["bytes"] == face.data for r in rows)


def test_webdataset_shards(ray_session, tiny_shards, tiny_folders):
    rows = rows_of([str(tiny_shards)])
    from_folders = {r["bytes"]: r["label"] for r in rows_of([str(tiny_folders)])}
    assert len(rows) == 24
    assert {r["bytes"]: r["label"] for r in rows} == from_folders
    assert all(".tar#" in r["path"] for r in rows)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_shard_members_over_the_limit_are_too_large_and_damage_keeps_what_came_before(tmp_path):
    """Shards stream member by member: a 2 MB member under a 1 MB limit is `too_large` (its label kept, its
    bytes never held), the samples around it are rows; a shard cut off inside a member keeps the samples
    before the cut, and the cut one is `read_failed`."""
    face = synth.sample(5, 0)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for key, data, label in (("a", face.data, b"happy"), ("big", face.data + bytes(2 << 20), b"sad"), ("c", face.data, b"0")):
            add_member(tar, f"{key}.jpg", data)
            add_member(tar, f"{key}.cls", label)
        add_member(tar, "d.cls", b"sad")  # a sample with no image
    rows = [r for block in sources.read_shard(pa.table({"path": [str(shard)], "source": [bytes(shard)]}), 1 << 20) for r in block.to_pylist()]
    assert [(r["path"].split("#")[1], r["label"], r["error"], len(r["bytes"])) for r in rows] == [
        ("a.jpg", "happy", None, len(face.data)), ("big.jpg", "sad", "too_large", 0),
        ("c.jpg", "happy", None, len(face.data)), ("d", "sad", None, 0),
    ]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: 3 * 512 + len(face.data) + 1000])  # inside the big member's data
    rows = [r for block in sources.read_shard(pa.table({"path": [str(cut)], "source": [bytes(cut)]}), 64 << 20) for r in block.to_pylist()]
    assert [(r["path"].split("#")[1], r["error"]) for r in rows] == [("a.jpg", None), ("big.jpg", "read_failed")]


def test_several_uris_are_combined(ray_session, tiny_shards, tiny_folders):
    assert len(rows_of([str(tiny_folders), str(tiny_shards)])) == 48


def test_s3_rows_equal_local_rows(ray_session, s3, tiny_folders, tiny_shards):
    folders_uri = upload_tree(s3, tiny_folders, "sources/folders")
    shards_uri = upload_tree(s3, tiny_shards, "sources/shards")
    for local, remote in ((tiny_folders, folders_uri), (tiny_shards, shards_uri)):
        local_rows = rows_by_key(str(local))
        s3_rows = rows_by_key(remote)
        assert len(s3_rows) == 24
        assert s3_rows == local_rows
    assert all(r["path"].startswith(f"s3://{BUCKET}/") for r in rows_of([shards_uri]))


def test_unusable_uris_fail_before_work_naming_the_uri(ray_session, tmp_path, s3):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "tom.jpg").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    cases = {
        str(tmp_path / "missing"): "no such folder",
        str(tmp_path): "no files under happy/ or sad/ and no .tar shards (found: cats, notes.txt)",
        str(tmp_path / "notes.txt"): "is a file",
        f"s3://{BUCKET}/no/such/prefix": "no such folder",
    }
    for uri, expected in cases.items():
        with pytest.raises(UsageError) as info:
            sources.list_labelled([uri])
        assert uri in str(info.value) and expected in str(info.value)
        assert "\n" not in str(info.value)


def test_s3_filesystem_honours_endpoint_variables(s3_server, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    storage.write_bytes(f"s3://{BUCKET}/storage/hello.txt", b"hello")
    assert storage.read_bytes(f"s3://{BUCKET}/storage/hello.txt") == b"hello"


def test_local_write_is_atomic_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "file.bin"
    storage.write_bytes(str(target), b"one")
    storage.write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_written_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        storage.write_bytes(str(tmp_path / "shared.json"), b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


# --- the split -------------------------------------------------------------

def blobs(n: int, start: int = 0) -> list[bytes]:
    return [f"image-{i}".encode() for i in range(start, start + n)]


def test_split_fractions_are_close_to_70_20_10():
    splits = [split_of(b) for b in blobs(20_000)]
    for name, share in (("train", 0.7), ("val", 0.2), ("test", 0.1)):
        assert abs(splits.count(name) / len(splits) - share) < 0.015


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    data = blobs(2000)
    assert [split_of(b, seed=7) for b in data] == [split_of(b, seed=7) for b in data]
    assert [split_of(b, seed=7) for b in data] != [split_of(b, seed=8) for b in data]


def test_split_is_stable_when_files_are_added():
    before = {b: split_of(b) for b in blobs(1000)}
    after = {b: split_of(b) for b in blobs(1000) + blobs(5000, start=1000)}
    assert all(after[b] == s for b, s in before.items())


def test_duplicates_land_together_whatever_their_names(tiny_folders, tmp_path):
    data = (next((tiny_folders / "sad").iterdir())).read_bytes()
    for seed in range(50):
        assert split_of(bytes(bytearray(data)), seed=seed) == split_of(data, seed=seed)


# --- synthetic data --------------------------------------------------------

def test_synth_is_deterministic_and_varied():
    a = [synth.sample(0, i) for i in range(40)]
    assert a == [synth.sample(0, i) for i in range(40)]
    assert {s.label for s in a} == {"happy", "sad"}
    assert {s.extension for s in a} == {"jpg", "png"}
    sizes = [header_size(s.data, sniff_format(s.data)) for s in a]
    assert len(set(sizes)) > 30
    assert all(200 <= w <= 800 and w == h for w, h in sizes)


def test_make_data_cli_writes_folders_and_shards(tmp_path):
    from conftest import run_cli

    result = run_cli("make-data", "--out", str(tmp_path / "f"), "--n", "10", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "f" / "happy").iterdir())) == 5
    assert len(list((tmp_path / "f" / "sad").iterdir())) == 5
    result = run_cli("make-data", "--out", str(tmp_path / "s"), "--n", "10", "--shards", "2")
    assert result.returncode == 0, result.stderr
    import tarfile

    names = [n for shard in sorted((tmp_path / "s").glob("*.tar")) for n in tarfile.open(shard).getnames()]
    assert len(names) == 20 and sum(n.endswith(".cls") for n in names) == 10
