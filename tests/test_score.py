"""Scoring: one row per input across folders, archives, single files and S3; parity; resume; job submit."""

import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from conftest import BUCKET, REPO, run_cli, upload_tree
from happysad import storage, synth
from happysad.decode import decode_image
from happysad.model import load_model
from happysad.score import ScoreConfig, run

BAD = {"empty.jpg": (b"", "empty"), "notes.txt": (b"just text", "not_an_image")}


def bomb_png() -> bytes:
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def good_images(n: int, seed: int = 21) -> dict[str, bytes]:
    return {f"{s.key}.{s.extension}": s.data for s in (synth.sample(seed, i) for i in range(n))}


def bad_images() -> dict[str, tuple[bytes, str]]:
    jpeg = synth.sample(5, 0).data if synth.sample(5, 0).extension == "jpg" else synth.sample(5, 2).data
    return BAD | {"cut.jpg": (jpeg[: len(jpeg) // 2], "truncated"), "bomb.png": (bomb_png(), "too_large")}


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory) -> tuple[Path, dict]:
    """A folder (nested), a .tar.gz, a .zip and a single file; returns (root, {path: expected error or None})."""
    root = tmp_path_factory.mktemp("mixed")
    expected = {}
    folder = root / "folder" / "nested"
    folder.mkdir(parents=True)
    for name, data in good_images(5).items():
        (folder / name).write_bytes(data)
        expected[str(folder / name)] = None
    for name, (data, reason) in bad_images().items():
        (folder / name).write_bytes(data)
        expected[str(folder / name)] = reason
    members = {name: (data, None) for name, data in good_images(4, seed=22).items()} | bad_images()
    with tarfile.open(root / "batch.tar.gz", "w:gz") as tar:
        for name, (data, reason) in members.items():
            info = tarfile.TarInfo(f"inner/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            expected[f"{root / 'batch.tar.gz'}#inner/{name}"] = reason
    with zipfile.ZipFile(root / "batch.zip", "w") as archive:
        for name, (data, reason) in members.items():
            archive.writestr(name, data)
            expected[f"{root / 'batch.zip'}#{name}"] = reason
    single = root / "single.png"
    single.write_bytes(good_images(1, seed=23).popitem()[1])
    expected[str(single)] = None
    return root, expected


def read_rows(output: str) -> list[dict]:
    fs, path = storage.filesystem(output)
    return pads.dataset(path, format="parquet", filesystem=fs).to_table().to_pylist()


def inputs_of(root: Path) -> tuple[str, ...]:
    return (str(root / "folder"), str(root / "batch.tar.gz"), str(root / "batch.zip"), str(root / "single.png"))


def test_one_row_per_input_with_errors_and_parity(ray_session, model_file, mixed_inputs, tmp_path):
    root, expected = mixed_inputs
    output = str(tmp_path / "scores")
    # Two replicas hold both CPUs of the test head: nothing upstream may need a CPU of its own (a
    # `repartition` task did, and the job waited forever).
    summary = run(ScoreConfig(inputs=inputs_of(root), output=output, model=str(model_file), batch_size=8, concurrency=2))
    rows = read_rows(output)
    assert len(rows) == len(expected) == summary["rows"]
    assert {r["path"] for r in rows} == set(expected)
    model_id = hashlib.sha256(model_file.read_bytes()).hexdigest()[:16]
    model = load_model(str(model_file))
    schema = pq.read_schema(next(Path(output).glob("*.parquet")))
    umask = os.umask(0o022)
    os.umask(umask)
    assert {f.stat().st_mode & 0o777 for f in Path(output).glob("*.parquet")} == {0o666 & ~umask}  # shareable, as umask says
    assert [(f.name, str(f.type)) for f in schema] == [
        ("path", "string"), ("score", "float"), ("label", "string"), ("error", "string"), ("model", "string"),
        ("error_detail", "string"),
    ]
    for row in rows:
        assert row["model"] == model_id
        assert row["error"] == expected[row["path"]], row["path"]
        if row["error"]:
            assert row["score"] is None and row["label"] is None and row["error_detail"]
            continue
        assert row["error_detail"] is None
        assert row["label"] == ("sad" if row["score"] >= 0.5 else "happy")
        if "#" not in row["path"]:
            direct = float(model(decode_image(Path(row["path"]).read_bytes())[None], training=False)[0, 0])
            assert row["score"] == pytest.approx(direct, abs=1e-5)
    assert summary["errors"] == {
        reason: 3 * sum(r == reason for _, r in bad_images().values()) for reason in {r for _, r in bad_images().values()}
    }


def test_predict_matches_score(ray_session, model_file, mixed_inputs, tmp_path):
    root, expected = mixed_inputs
    local = sorted(p for p, e in expected.items() if e is None and "#" not in p)[:2]
    output = str(tmp_path / "scores")
    run(ScoreConfig(inputs=tuple(local), output=output, model=str(model_file)))
    scores = {r["path"]: r["score"] for r in read_rows(output)}
    result = run_cli("predict", "--model", str(model_file), *local, str(root / "folder" / "nested" / "notes.txt"))
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert len(lines) == 3 and lines[2][1:] == ["error", "not_an_image"]
    for path, label, score in lines[:2]:
        assert float(score) == pytest.approx(scores[path], abs=1e-5)
        assert label == ("sad" if float(score) >= 0.5 else "happy")


def test_s3_archive_and_prefix_in_parquet_out(ray_session, s3, model_file, mixed_inputs):
    root, expected = mixed_inputs
    prefix = upload_tree(s3, root / "folder", "score/in/folder")
    s3.upload_file(str(root / "batch.zip"), BUCKET, "score/in/batch.zip")
    s3.upload_file(str(model_file), BUCKET, "score/model.keras")
    output = f"s3://{BUCKET}/score/out"
    run(ScoreConfig(inputs=(prefix, f"s3://{BUCKET}/score/in/batch.zip"), output=output, model=f"s3://{BUCKET}/score/model.keras"))
    rows = read_rows(output)
    local_zip = {p.split("#")[1]: e for p, e in expected.items() if "batch.zip#" in p}
    local_folder = {Path(p).name: e for p, e in expected.items() if "/folder/" in p}
    assert len(rows) == len(local_zip) + len(local_folder)
    for row in rows:
        assert row["path"].startswith(f"s3://{BUCKET}/score/in/")
        name = row["path"].split("#")[1] if "#" in row["path"] else row["path"].rsplit("/", 1)[1]
        assert row["error"] == (local_zip if "#" in row["path"] else local_folder)[name]


def test_killed_run_resumes_to_exactly_one_row_per_input(ray_session, model_file, tmp_path):
    source = tmp_path / "many"
    source.mkdir()
    image = synth.sample(9, 0).data
    for i in range(400):
        (source / f"img{i:04d}.jpg").write_bytes(image)
    output = tmp_path / "scores"
    args = ["score", "--model", str(model_file), "--input", str(source), "--output", str(output), "--batch-size", "16", "--rows-per-file", "16"]
    proc = subprocess.Popen([sys.executable, "-m", "happysad.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and len(list(output.glob(".staging-*/*.parquet"))) < 2:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(output.glob("*.parquet")), "a killed run publishes nothing outside staging"
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(str(output))
    paths = [r["path"] for r in rows]
    assert len(paths) == 400 and len(set(paths)) == 400
    assert not list(output.glob(".staging-*"))
    assert max(pq.read_metadata(f).num_rows for f in output.glob("*.parquet")) <= 16  # --rows-per-file is a bound
    assert "scored" in result.stdout


@pytest.mark.parametrize(
    "args, named",
    [
        (["--output", "x"], "--input"),
        (["--input", "/no/such/place", "--output", "x", "--model", "MODEL"], "/no/such/place"),
        (["--input", ".", "--output", "x", "--model", "/no/model.keras"], "/no/model.keras"),
        (["--input", ".", "--output", "x", "--batch-size", "0"], "--batch-size"),
        (["--input", ".", "--output", "x", "--model", "CORRUPT"], "--model CORRUPT"),
        (["--input", ".", "--output", "x", "--model", "LAMBDA"], "layer 'Lambda' is not part of the happysad CNN"),
    ],
)
def test_bad_arguments_exit_2_at_once(args, named, model_file, lambda_model, tmp_path):
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(model_file.read_bytes()[:5000])
    values = {"MODEL": str(model_file), "CORRUPT": str(corrupt), "LAMBDA": str(lambda_model[0])}
    started = time.monotonic()
    result = run_cli("score", *[values.get(a, a) for a in args])
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and named.replace("CORRUPT", str(corrupt)) in result.stderr
    assert time.monotonic() - started < 30  # refused in the driver, before any Ray work
    assert not lambda_model[1].exists()


def test_predict_refuses_a_lambda_model_without_running_it(lambda_model, mixed_inputs):
    root, _ = mixed_inputs
    result = run_cli("predict", "--model", str(lambda_model[0]), str(root / "single.png"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "Lambda" in result.stderr
    assert not lambda_model[1].exists()


def test_inputs_are_resolved_deduplicated_and_failed_reads_retried(ray_session, model_file, tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    images = good_images(3, seed=31)
    for (name, data), where in zip(images.items(), ("", "sub/", "sub/")):
        (photos / f"{where}{name}").write_bytes(data)
    later = photos / "later.jpg"
    later.symlink_to(tmp_path / "not-yet.jpg")  # dangling: read_failed for now
    with tarfile.open(photos / "batch.tar", "w") as tar:  # a garbage archive first: one read_failed row
        pass
    (photos / "batch.tar").write_bytes(b"garbage, not a tar")
    output = photos / "scores"  # inside an input: never scored itself
    args = ["score", "--model", str(model_file), "--input", "photos", "--input", "photos/sub", "--output", "photos/scores"]

    def score() -> tuple[list[dict], str]:
        result = subprocess.run([sys.executable, "-m", "happysad.cli", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return read_rows(str(output)), result.stdout

    rows, stdout = score()
    errors = {r["path"]: r["error"] for r in rows}
    assert len(rows) == len(errors) == 5 and "scored 5 inputs in " in stdout and "; 5 rows in all: " in stdout
    assert errors == {str(photos / n): None for n in (f"{list(images)[0]}", f"sub/{list(images)[1]}", f"sub/{list(images)[2]}")} | {
        str(later): "read_failed", str(photos / "batch.tar"): "read_failed"
    }

    (tmp_path / "not-yet.jpg").write_bytes(images[list(images)[0]])
    with tarfile.open(photos / "batch.tar", "w") as tar:
        for name, data in good_images(2, seed=32).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    args[args.index("photos/sub")] = str(photos / "sub")  # spelled differently: the same files
    rows, stdout = score()
    errors = {r["path"]: r["error"] for r in rows}
    assert len(rows) == len(errors) == 6 and "scored 3 inputs in " in stdout and "; 6 rows in all: " in stdout
    assert errors[str(later)] is None and str(photos / "batch.tar") not in errors
    assert sum(p.startswith(f"{photos / 'batch.tar'}#") for p in errors) == 2

    rows, stdout = score()
    assert len(rows) == 6 and "scored 0 inputs in " in stdout and "; 6 rows in all: " in stdout


def test_a_second_run_on_the_same_output_is_refused(model_file, mixed_inputs, tmp_path):
    root, _ = mixed_inputs
    output = tmp_path / "scores"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        output.mkdir()
        (output / ".lock").write_text(f'{{"run": "other", "host": "{socket.gethostname()}", "pid": {holder.pid}, "heartbeat": 0}}')
        result = run_cli("score", "--model", str(model_file), "--input", str(root / "single.png"), "--output", str(output))
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert f"--output {output}: another run (pid {holder.pid}" in result.stderr
        assert not list(output.glob("*.parquet"))
    finally:
        holder.kill()
        holder.wait()


def test_default_model_is_the_newest_run(tmp_path, monkeypatch, model_file, capsys):
    from happysad.score import resolve_model

    monkeypatch.chdir(tmp_path)
    for name, age in (("exp1", 3600), ("20261127-013000", 0)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        target = tmp_path / "runs" / name / "model.keras"
        target.write_bytes(model_file.read_bytes())
        os.utime(target, (time.time() - age, time.time() - age))
    assert resolve_model("") == str(tmp_path / "runs" / "20261127-013000" / "model.keras")
    assert capsys.readouterr().err == f"--model not given: the newest run's, {tmp_path / 'runs' / '20261127-013000' / 'model.keras'}\n"


def test_ray_job_submit_runs_score(ray_session, model_file, mixed_inputs, tmp_path):
    root, expected = mixed_inputs
    output = tmp_path / "job-scores"
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_session["dashboard"],
        "--working-dir", ".", "--", "python", "jobs/score.py", "--model", str(model_file),
        "--input", str(root / "batch.zip"), "--output", str(output),
    ]
    result = subprocess.run(cmd, cwd=REPO, env=ray_session["env"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(read_rows(str(output))) == sum("batch.zip#" in p for p in expected)


def test_scores_agree_across_keras_backends(ray_session, model_file, mixed_inputs, tmp_path):
    """The replicas call the model through Keras only: JAX scores equal TensorFlow's, and predict runs without TensorFlow."""
    root, expected = mixed_inputs
    scores = {}
    for backend in ("tensorflow", "jax"):
        output = tmp_path / backend
        env = dict(os.environ, KERAS_BACKEND=backend)
        result = run_cli("score", "--model", str(model_file), "--input", str(root / "folder"), "--output", str(output), env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"keras backend {backend}" in result.stdout + result.stderr
        scores[backend] = {r["path"]: r["score"] for r in read_rows(str(output))}
    assert scores["tensorflow"].keys() == scores["jax"].keys() and len(scores["jax"]) == sum("/folder/" in p for p in expected)
    for path, score in scores["tensorflow"].items():
        assert (score is None and scores["jax"][path] is None) or scores["jax"][path] == pytest.approx(score, abs=1e-5)

    no_tensorflow = (  # an import hook that makes TensorFlow impossible to import, as on a node without it
        "import sys\n"
        "class NoTensorFlow:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'tensorflow':\n"
        "            raise ImportError('no tensorflow on this node')\n"
        "sys.meta_path.insert(0, NoTensorFlow())\n"
        "from happysad.cli import main\n"
        "sys.exit(main())\n"
    )
    image = next(p for p, e in expected.items() if e is None and "/folder/" in p)
    result = subprocess.run(
        [sys.executable, "-c", no_tensorflow, "predict", "--model", str(model_file), image],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, KERAS_BACKEND="jax"), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("\t")[2]) == pytest.approx(scores["tensorflow"][image], abs=1e-5)


def test_progress_in_a_log_counts_inputs_against_a_total_that_includes_archive_members(ray_session, model_file, tmp_path):
    """A line every second (HAPPYSAD_PROGRESS_S=1, the default is 10) on stderr, which is a pipe here: the count
    is replicas' rows, the total the files plus the members listed so far ('+' while archives are still listed).
    The same job writes its rows gathered into files of up to --rows-per-file rows."""
    import re

    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in good_images(240, seed=41).items():
        (folder / name).write_bytes(data)
    with zipfile.ZipFile(folder / "more.zip", "w") as archive:
        for name, data in good_images(60, seed=42).items():
            archive.writestr(name, data)
    env = dict(os.environ, HAPPYSAD_PROGRESS_S="1")
    output = tmp_path / "out"
    result = run_cli("score", "--model", str(model_file), "--input", str(folder), "--output", str(output),
                     "--batch-size", "16", "--rows-per-file", "200", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # The same job's files: blocks of 64 rows (4 batches) gathered into files of 137 to 200 rows, not a file a block.
    rows_per_file = [pq.read_metadata(f).num_rows for f in output.glob("*.parquet")]
    assert sum(rows_per_file) == 300 and max(rows_per_file) <= 200 and len(rows_per_file) <= 3, rows_per_file
    lines = re.findall(r"^scored: ([\d,]+)/([\d,]+)(\+?)", result.stderr, re.M)
    assert len(lines) >= 2, result.stderr[-3000:]
    done = [int(d.replace(",", "")) for d, _, _ in lines]
    assert done == sorted(done) and done[-1] <= 300
    final = [int(t.replace(",", "")) for _, t, more in lines if not more]
    assert all(total == 300 for total in final) and all(int(t.replace(",", "")) <= 300 for _, t, _ in lines)
    assert "\x1b[" not in result.stderr and "Running Dataset" not in result.stderr  # no Ray Data progress block


def test_a_small_job_without_a_cluster_runs_in_process_with_the_same_rows(ray_session, model_file, mixed_inputs, tmp_path):
    """No RAY_ADDRESS, a few inputs: scored in the driver's own process (no Ray session is created: Ray's temp
    folder stays empty), with the rows the Ray pipeline gives, and its rerun finishes only what is missing."""
    root, expected = mixed_inputs
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    here = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    in_process, on_ray = tmp_path / "in-process", tmp_path / "on-ray"
    first = run_cli("score", "--model", str(model_file), *sum((["--input", i] for i in inputs_of(root)[:2]), []),
                    "--output", str(in_process), env=here)
    assert first.returncode == 0, first.stderr[-3000:]
    done_first = len(read_rows(str(in_process)))
    result = run_cli("score", "--model", str(model_file), *sum((["--input", i] for i in inputs_of(root)), []),
                     "--output", str(in_process), env=here)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(ray_tmp.iterdir())  # no Ray session was started
    assert 0 < done_first < len(expected) and f"scored {len(expected) - done_first} inputs in " in result.stdout
    run(ScoreConfig(inputs=inputs_of(root), output=str(on_ray), model=str(model_file)))  # the session's Ray head
    here_rows = {r["path"]: r for r in read_rows(str(in_process))}
    ray_rows = {r["path"]: r for r in read_rows(str(on_ray))}
    assert set(here_rows) == set(ray_rows) == set(expected)
    for path, row in ray_rows.items():
        mine = here_rows[path]
        assert (mine["error"], mine["label"], mine["model"]) == (row["error"], row["label"], row["model"]), path
        assert (mine["score"] is None and row["score"] is None) or abs(mine["score"] - row["score"]) < 1e-5
