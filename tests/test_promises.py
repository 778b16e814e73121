"""Scoring's promises by construction: whatever an input is or is named, it gets exactly one row of its own.

The fuzz job scores hundreds of damaged archives with odd member names beside files whose names print
alike; the tests without Ray pin each cause on its own: any exception is a row, the path escapes what
its encoding uses, a rerun retires only its own rows and never mixes two models, archives rewritten
after listing are caught, and the output folder is found by its real path.
"""

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import BUCKET, run_cli
from happysad import inputs, score, score_output, storage, synth
from happysad.cli import build_parser
from happysad.storage import UsageError

JPEG = next(s.data for s in (synth.sample(5, i) for i in range(10)) if s.extension == "jpg")
NO_DONE = np.empty(0, np.uint64)
ODD_NAMES = ["", "/", "..", "../up.jpg", "nul\0byte.jpg", "x" * 4096 + ".jpg", "100%.jpg", "a#b.jpg", "caf\u00e9.jpg"]


def archive_rows(uri: str, source: bytes | None = None) -> list[dict]:
    """The rows scoring gets for an archive without Ray: its reader's blocks, members read by reference filled in."""
    rows = []
    for block in inputs.read_archive({"path": [uri], "source": [source or uri.encode()]}, 64 << 20, NO_DONE):
        read = inputs.read_files(block.to_pydict(), 64 << 20)
        rows += [dict(zip(read, values)) for values in zip(*read.values())]
    return rows


class _AnyName(zipfile.ZipInfo):
    def is_dir(self) -> bool:  # zipfile's own raises IndexError on an empty name: it could not write one
        return False


def odd_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i, name in enumerate(ODD_NAMES):
            # zipfile cuts a name at NUL when it is made: write a placeholder of the same length, patched below
            archive.writestr(_AnyName(name.replace("\0", "\x01")), JPEG if i % 2 else JPEG[:100])
    return buffer.getvalue().replace(b"nul\x01byte", b"nul\x00byte")


def odd_tar(compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compressed else "w", format=tarfile.PAX_FORMAT) as tar:
        for i, name in enumerate(n for n in ODD_NAMES if n):  # tarfile reads an empty name as the end
            info = tarfile.TarInfo(name)
            data = JPEG if i % 2 else JPEG[:100]
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def mutants(base: bytes, rng: random.Random, count: int) -> list[bytes]:
    """`count` damaged copies of an archive: bytes flipped, spans overwritten, or cut short at some point."""
    out = []
    for _ in range(count):
        data = bytearray(base)
        roll = rng.random()
        if roll < 0.4:
            for _ in range(rng.choice((1, 3, 10))):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif roll < 0.7:
            at = rng.randrange(len(data))
            data[at : at + rng.randrange(1, 200)] = rng.randbytes(rng.randrange(200))
        else:
            del data[rng.choice((1, 10, 100, 512, len(data) // 2, len(data) - 30, len(data) - 1)) :]
        out.append(bytes(data))
    return out


def write_raw(folder: Path, raw_name: bytes, data: bytes) -> bytes:
    path = os.fsencode(str(folder)) + b"/" + raw_name
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture(scope="module")
def hostile_inputs(tmp_path_factory) -> Path:
    """300+ damaged archives with odd member names, and files whose names print alike in one folder."""
    root = tmp_path_factory.mktemp("hostile")
    rng = random.Random(18)
    bases = {"zip": odd_zip(), "tar": odd_tar(), "tar.gz": odd_tar(compressed=True)}
    for kind, base in bases.items():
        (root / f"base.{kind}").write_bytes(base)
        for i, data in enumerate(mutants(base, rng, 110)):
            (root / f"m{i:03d}.{kind}").write_bytes(data)
    for kind in bases:  # zero bytes: `empty`, like an empty image
        (root / f"zero.{kind}").write_bytes(b"")
    write_raw(root, b"caf%E9.jpg", JPEG)  # UTF-8, a literal percent sign...
    write_raw(root, b"caf\xe9.jpg", JPEG)  # ...and Latin-1: both printed caf%E9.jpg before
    (root / "a.tar#x.jpg").write_bytes(JPEG)  # a file whose name looks like member x.jpg of a.tar
    with tarfile.open(root / "a.tar", "w") as tar:
        info = tarfile.TarInfo("x.jpg")
        info.size = len(JPEG)
        tar.addfile(info, io.BytesIO(JPEG))
    return root


def owner(path: str) -> str:
    return path.split("#", 1)[0]


def test_300_damaged_archives_and_odd_names_one_row_each_in_one_job(ray_session, model_file, hostile_inputs, tmp_path):
    """Every listed input gets its rows and only its rows, exactly once, whatever breaks inside it, and the
    job exits 0. The rows of each archive are those its reader gives on its own (no row lost or shared)."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "NOTES.txt").write_text("the user's own notes: not Parquet, left alone\n")
    started = time.monotonic()
    result = run_cli("score", "--model", str(model_file), "--input", str(hostile_inputs), "--output", str(output), "--batch-size", "16")
    print(f"fuzz job: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pq.read_table(sorted(output.glob("*.parquet"))).to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths))
    listed = sorted(os.listdir(os.fsencode(hostile_inputs)))
    assert len(listed) >= 300 + 8
    expected = {}
    for raw in listed:
        uri = storage.display_path(os.fsencode(str(hostile_inputs)) + b"/" + raw)
        assert urllib.parse.unquote_to_bytes(uri) == os.fsencode(str(hostile_inputs)) + b"/" + raw
        if inputs.is_archive(uri) and os.path.getsize(os.fsencode(str(hostile_inputs)) + b"/" + raw):
            expected |= {r["path"]: r["error"] for r in archive_rows(uri)}
        else:
            expected[uri] = "empty" if raw.startswith(b"zero.") else None
    assert set(paths) == set(expected)
    by_path = {r["path"]: r for r in rows}
    for path, read_error in expected.items():
        row = by_path[path]
        assert (row["score"] is None) == (row["error"] is not None) == (row["error_detail"] is not None), row
        if read_error:  # what the reader said, the job says
            assert row["error"] == read_error, row
    root = str(hostile_inputs)
    assert by_path[f"{root}/caf%25E9.jpg"]["error"] is None and by_path[f"{root}/caf%E9.jpg"]["error"] is None
    assert by_path[f"{root}/a.tar%23x.jpg"]["error"] is None and by_path[f"{root}/a.tar#x.jpg"]["error"] is None
    assert {by_path[f"{root}/zero.{k}"]["error"] for k in ("zip", "tar", "tar.gz")} == {"empty"}
    assert any(p.startswith(f"{root}/base.zip#") and p.endswith("#") for p in paths)  # the empty member name
    assert (output / "NOTES.txt").exists()
    record = json.loads((output / score_output.RECORD).read_text())
    assert record["model"] == rows[0]["model"] and record["threshold"] == 0.5

    # A rerun with another threshold would add rows of another decision rule: refused, one line, exit 2.
    result = run_cli("score", "--model", str(model_file), "--input", str(hostile_inputs), "--output", str(output), "--threshold", "0.3")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"--output {output}: holds rows of model {record['model']} at threshold 0.5" in result.stderr


def test_any_exception_inside_an_archive_is_a_row(tmp_path):
    """A zip member with an empty name made zipfile raise IndexError, which failed the whole job."""
    path = tmp_path / "emptyname.zip"
    path.write_bytes(odd_zip())
    rows = archive_rows(str(path))
    # zipfile reads a name up to its NUL; "/" is a folder
    assert [r["path"] for r in rows] == [f"{path}#{storage.display_path(n.split(chr(0))[0].encode())}" for n in ODD_NAMES if n != "/"]
    empty = rows[0]
    assert empty["path"] == f"{path}#" and empty["error"] == "read_failed" and empty["error_detail"].startswith("IndexError")
    assert {r["path"]: r["error"] for r in rows}[f"{path}#a%23b.jpg"] is None


def test_names_that_printed_alike_are_two_inputs(tmp_path):
    write_raw(tmp_path, b"caf%E9.jpg", JPEG)
    write_raw(tmp_path, b"caf\xe9.jpg", JPEG + b"latin")
    (tmp_path / "a.tar#x.jpg").write_bytes(JPEG)
    found = inputs.expand([str(tmp_path)])
    paths = found.files["path"].to_pylist()
    assert paths == [f"{tmp_path}/a.tar%23x.jpg", f"{tmp_path}/caf%25E9.jpg", f"{tmp_path}/caf%E9.jpg"]
    read = inputs.read_files(found.files.to_pydict(), 1 << 20)
    for path, data in zip(paths, read["bytes"]):  # each path maps back to its own file's bytes
        with open(urllib.parse.unquote_to_bytes(path), "rb") as f:
            assert f.read() == data


def test_a_rerun_retires_only_the_failed_rows_of_its_own_inputs(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    rows = {
        "path": ["/a/broken.tar", "/a/x.zip#m.jpg", "/b/broken.tar", "/b/x.zip#m.jpg", "/b/ok.jpg"],
        "error": ["read_failed"] * 4 + [None],
    }
    table = pa.table(rows | {"model": ["m"] * 5}).cast(pa.schema([(n, pa.string()) for n in ("path", "error", "model")]))
    pq.write_table(table, output / "part-0.parquet")
    b_only = inputs.Inputs(inputs.file_rows([]).slice(0, 0), [storage.Listed("/b/broken.tar", b"/b/broken.tar", 9),
                                                             storage.Listed("/b/x.zip", b"/b/x.zip", 9)], 0)
    assert score_output.retire_read_failed(str(output), b_only) == 2
    left = pq.read_table(output / "part-0.parquet").column("path").to_pylist()
    assert left == ["/a/broken.tar", "/a/x.zip#m.jpg", "/b/ok.jpg"]


def test_an_output_keeps_one_model_and_threshold(tmp_path, model_file):
    output = tmp_path / "out"
    output.mkdir()
    model = score.open_model(str(model_file))
    pq.write_table(pa.table({"path": ["/x.jpg"], "model": ["0123456789abcdef"]}), output / "old.parquet")
    with pytest.raises(UsageError, match=f"--output {output}: holds rows of model 0123456789abcdef"):
        score_output.check_record(str(output), model)  # an output from before the record: its rows' model counts
    (output / "old.parquet").unlink()
    score_output.check_record(str(output), model)  # no rows yet: this run's record
    pq.write_table(pa.table({"path": ["/x.jpg"], "model": [model.id]}), output / "new.parquet")
    score_output.check_record(str(output), model)
    with pytest.raises(UsageError, match="at threshold 0.5; this run's model .* at threshold 0.7"):
        score_output.check_record(str(output), score.Model(model.uri, model.id, 0.7))
    for damaged in (b'{"model": ', b"\xff\xfe", b"[]"):  # a damaged record is refused in one line, never a traceback
        (output / score_output.RECORD).write_bytes(damaged)
        with pytest.raises(UsageError, match=f"--output {output}: _scoring.json is damaged"):
            score_output.check_record(str(output), model)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_an_archive_rewritten_after_listing_gives_read_failed_rows(tmp_path, kind):
    """Rows point at offsets in the archive as listed: read from another version they would hold other bytes."""
    images = [synth.sample(7, i).data for i in range(3)]

    def write(order: list[int]) -> None:
        if kind == "zip":
            with zipfile.ZipFile(path, "w") as archive:
                for name, i in zip("abc", order):
                    archive.writestr(f"{name}.jpg", images[i])
        else:
            with tarfile.open(path, "w") as tar:
                for name, i in zip("abc", order):
                    info = tarfile.TarInfo(f"{name}.jpg")
                    info.size = len(images[i])
                    tar.addfile(info, io.BytesIO(images[i]))

    path = tmp_path / f"x.{kind}"
    write([0, 1, 2])
    blocks = list(inputs.read_archive({"path": [str(path)], "source": [bytes(path)]}, 64 << 20, NO_DONE))
    write([2, 1, 0])  # same names, other bytes at each offset
    read = inputs.read_files(blocks[0].to_pydict(), 64 << 20)
    assert read["error"] == ["read_failed"] * 3 and all(inputs.CHANGED in d for d in read["error_detail"])
    unchanged = inputs.read_files(next(inputs.read_archive({"path": [str(path)], "source": [bytes(path)]}, 64 << 20, NO_DONE)).to_pydict(), 64 << 20)
    assert unchanged["bytes"] == [images[2], images[1], images[0]]


def test_the_output_is_found_by_its_real_path_and_hidden_files_count_once(tmp_path):
    (tmp_path / "in" / "sub" / ".cache").mkdir(parents=True)
    (tmp_path / "in" / "a.jpg").write_bytes(JPEG)
    (tmp_path / "in" / "sub" / ".cache" / "h.jpg").write_bytes(JPEG)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-0.parquet").write_bytes(b"PAR1")
    (tmp_path / "in" / "scores-link").symlink_to(tmp_path / "out")  # a link to the output folder...
    (tmp_path / "in" / "part.parquet").symlink_to(tmp_path / "out" / "part-0.parquet")  # ...and to a file in it
    (tmp_path / "out-link").symlink_to(tmp_path / "out")
    for output in (tmp_path / "out", tmp_path / "out-link"):  # the output named directly or through a link
        found = inputs.expand([str(tmp_path / "in"), str(tmp_path / "in" / "sub")], str(output))
        assert found.files["path"].to_pylist() == [f"{tmp_path}/in/a.jpg"]
        assert found.hidden == 1  # seen through both inputs, one file
    assert inputs.expand([str(tmp_path / "out-link")], str(tmp_path / "out")).files.num_rows == 0


def test_zero_byte_archives_are_empty_files_and_pending_counts_only_what_is_left(tmp_path):
    for kind in ("tar", "zip", "tar.gz"):
        (tmp_path / f"zero.{kind}").write_bytes(b"")
    (tmp_path / "x.zip").write_bytes(odd_zip())
    found = inputs.expand([str(tmp_path)])
    assert [Path(p).name for p in found.files["path"].to_pylist()] == ["zero.tar", "zero.tar.gz", "zero.zip"]
    assert [a.uri for a in found.archives] == [str(tmp_path / "x.zip")]
    done = np.unique(inputs.path_hashes([str(tmp_path / "zero.tar"), str(tmp_path / "x.zip")]))
    todo = inputs.pending(found, done)
    assert todo.files.num_rows == 2 and todo.archives == []


def test_a_tilde_after_equals_is_home_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["score", "--input=~/in", "--output=~/scores"])
    assert args.output == f"{tmp_path}/scores" and args.input == [f"{tmp_path}/in"]
    assert storage.join("~/scores", ".lock") == f"{tmp_path}/scores/.lock"


def test_an_s3_key_with_an_empty_path_component_is_read(s3):
    """`in//double.jpg` is a legal S3 key that pyarrow refuses (ArrowInvalid): boto3 reads it."""
    s3.put_object(Bucket=BUCKET, Key="promises/d//double.jpg", Body=JPEG)
    s3.put_object(Bucket=BUCKET, Key="promises/d/a#b%.jpg", Body=JPEG)
    found = inputs.expand([f"s3://{BUCKET}/promises/d"])
    assert found.files["path"].to_pylist() == [f"s3://{BUCKET}/promises/d//double.jpg", f"s3://{BUCKET}/promises/d/a%23b%25.jpg"]
    read = inputs.read_files(found.files.to_pydict(), 1 << 20)
    assert read["bytes"] == [JPEG, JPEG] and read["error"] == [None, None]


def test_an_output_that_is_a_file_or_gpu_that_cannot_come_exits_2_with_one_line(ray_session, model_file, tiny_folders, tmp_path):
    taken = tmp_path / "taken.parquet"
    taken.write_bytes(b"x")
    started = time.monotonic()
    result = run_cli("score", "--model", str(model_file), "--input", str(tmp_path), "--output", str(taken))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"happysad score: error: --output {taken}: is a file; expected a folder or s3:// prefix for the Parquet files"
    ]
    assert time.monotonic() - started < 30
    (tmp_path / "a.jpg").write_bytes(JPEG)
    job = subprocess.run(
        [sys.executable, "-m", "happysad.cli", "score", "--model", str(model_file), "--input", str(tmp_path / "a.jpg"),
         "--output", str(tmp_path / "out"), "--gpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert job.returncode == 2, job.stderr[-2000:]
    assert job.stderr.strip().splitlines()[-1].startswith("happysad score: error: --gpu: no node of this cluster has a GPU")
    train = run_cli("train", "--data", str(tiny_folders), "--output", str(tmp_path / "run"), "--gpu", "--epochs", "1", timeout=180)
    assert train.returncode == 2, train.stderr[-2000:]
    assert train.stderr.strip().splitlines()[-1].startswith("happysad train: error: --gpu: no node of this cluster has a GPU")
