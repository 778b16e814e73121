"""evaluate: metrics that follow from predictions.parquet alone, a page a browser shows, bad input refused at once."""

import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import BUCKET, REPO, run_cli, upload_tree
from happysad import score_output, storage, synth
from happysad.decode import decode_image
from happysad.evaluate import EvaluateConfig, run
from happysad.model import build_model

THRESHOLD = 0.47  # model.json's, deliberately not 0.5: evaluate must use the model's


@pytest.fixture(scope="module")
def labelled_set(tmp_path_factory) -> Path:
    """40 faces in class folders, one undecodable file, one hidden file and one file outside happy/ and sad/."""
    root = synth.make_data(tmp_path_factory.mktemp("eval") / "faces", n=40, seed=11)
    (root / "happy" / "broken.jpg").write_bytes(b"not a picture")
    (root / "sad" / ".DS_Store").write_bytes(b"hidden")
    (root / "README.txt").write_bytes(b"no label")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, labelled_set) -> Path:
    """A model trained for a few epochs on the same faces (scores spread out), with model.json beside it."""
    import keras

    keras.utils.set_random_seed(0)
    images, labels = [], []
    for label, cls in enumerate(("happy", "sad")):
        for path in sorted((labelled_set / cls).iterdir()):
            if path.name.startswith(("broken", ".")):
                continue
            images.append(decode_image(path.read_bytes()))
            labels.append(label)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.fit(np.stack(images), np.array(labels, np.float32), epochs=4, batch_size=8, verbose=0)
    root = tmp_path_factory.mktemp("run")
    model.save(root / "model.keras")
    (root / "model.json").write_text(json.dumps({"threshold": THRESHOLD, "classes": ["happy", "sad"], "image_size": 256}))
    return root


@pytest.fixture(scope="module")
def evaluated(ray_session, labelled_set, run_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("evaluated") / "out"
    run(EvaluateConfig(data=(str(labelled_set),), output=str(output), model=str(run_dir), batch_size=8))
    return output


def numpy_metrics(scores: np.ndarray, sad: np.ndarray, threshold: float) -> dict:
    """The metrics recomputed by hand: counts, all-pairs AUC (ties count half), clipped log loss."""
    called = scores >= threshold
    tp, fp, fn, tn = (np.sum(called & sad), np.sum(called & ~sad), np.sum(~called & sad), np.sum(~called & ~sad))
    pairs = scores[sad][:, None] - scores[~sad][None, :]
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    return {
        "accuracy": (tp + tn) / len(scores), "precision": tp / (tp + fp), "recall": tp / (tp + fn),
        "f1": 2 * tp / (2 * tp + fp + fn), "auc": np.mean((pairs > 0) + 0.5 * (pairs == 0)),
        "loss": -np.mean(sad * np.log(p) + (~sad) * np.log(1 - p)), "matrix": [[tn, fp], [fn, tp]],
    }


def test_metrics_equal_a_numpy_recomputation_from_the_parquet_rows(evaluated, labelled_set):
    result = json.loads((evaluated / "evaluation.json").read_text())
    table = pq.read_table(evaluated / "predictions.parquet")
    assert table.column_names == [*score_output.SCHEMA.names, "true_label"]  # score's columns, then true_label
    assert table.column_names[:5] == ["path", "score", "label", "error", "model"]
    rows = table.to_pylist()
    files = {str(p) for p in labelled_set.glob("*/*") if not p.name.startswith(".")}
    assert {r["path"] for r in rows} == files  # one row per labelled file, the broken one included
    for r in rows:
        assert r["true_label"] == Path(r["path"]).parent.name
    broken = next(r for r in rows if r["path"].endswith("broken.jpg"))
    assert broken["error"] == "not_an_image" and broken["score"] is None
    scored = [r for r in rows if r["error"] is None]
    scores = np.array([r["score"] for r in scored], np.float64)
    sad = np.array([r["true_label"] == "sad" for r in scored])
    assert 0 < sad.sum() < len(sad) and len(np.unique(scores)) > 10  # a real spread: nothing is trivially 0 or 1
    for r in scored:
        assert r["label"] == ("sad" if r["score"] >= THRESHOLD else "happy")
    expected = numpy_metrics(scores, sad, THRESHOLD)
    assert result["n"] == len(scored) == 40 and result["threshold"] == pytest.approx(THRESHOLD)
    for name in ("accuracy", "precision", "recall", "f1", "auc", "loss"):
        assert result[name] == pytest.approx(expected[name], abs=1e-6), name
    assert result["confusion_matrix"]["matrix"] == [[int(v) for v in row] for row in expected["matrix"]]
    assert result["skipped"] == {"hidden": 1, "no_label": 1, "not_an_image": 1}
    assert result["counts"] == {"happy": int((~sad).sum()), "sad": int(sad.sum())}


def test_both_placements_keep_true_label(labelled_set, run_dir):
    """CPU: the replica reads and decodes; --gpu: a decode stage first. Both give the same rows, labels kept."""
    from happysad.evaluate import LabelledReplica, _decode_labelled
    from happysad.score import open_model

    paths = sorted(labelled_set.glob("*/*.*"))[:6]
    batch = {
        "path": [str(p) for p in paths], "bytes": [p.read_bytes() for p in paths], "error": [None] * 6,
        "source": [b""] * 6, "size": [0] * 6, "offset": [-1] * 6, "true_label": [p.parent.name for p in paths],
    }
    replica = LabelledReplica(open_model(str(run_dir)), batch_size=4, max_bytes=1 << 20)
    on_cpu = replica(dict(batch)).to_pylist()
    on_gpu_path = replica(_decode_labelled(dict(batch), 1 << 20)).to_pylist()
    assert on_cpu == on_gpu_path and [r["true_label"] for r in on_cpu] == batch["true_label"]
    assert {r["error"] for r in on_cpu} == ({None, "not_an_image"} if any("broken" in p.name for p in paths) else {None})


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browse(page: Path, screenshot: Path) -> str:
    """Load the page headless as a person's browser would; save a screenshot, return the DOM it built."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ]
    with tempfile.TemporaryDirectory() as profile:
        base = [chromium(), *flags, f"--user-data-dir={profile}"]
        subprocess.run([*base, f"--screenshot={screenshot}", "--window-size=1200,2400", page.as_uri()], capture_output=True, timeout=120, check=True)
    with tempfile.TemporaryDirectory() as profile:
        base = [chromium(), *flags, f"--user-data-dir={profile}"]
        return subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed and could not be (.ci/run installs it from Debian)")
def test_report_shows_in_a_browser_with_matrix_and_16_thumbnails(evaluated, labelled_set, tmp_path):
    import cv2

    page = evaluated / "report.html"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    model_uri = json.loads((evaluated / "evaluation.json").read_text())["model_uri"]
    assert f"<h1>Evaluation of {model_uri} on {labelled_set}</h1>" in html  # named by what was evaluated
    screenshot = tmp_path / "report.png"
    dom = browse(page, screenshot)
    pixels = cv2.imread(str(screenshot))
    assert pixels is not None and pixels.shape[:2] == (2400, 1200)
    assert pixels.std() > 20  # a page with plots and faces, not a blank or error page
    matrix = re.search(r'<table id="confusion-matrix">(.*?)</table>', dom, re.S).group(1)
    cells = [int(v) for v in re.findall(r"<td[^>]*>(\d+)</td>", matrix)]
    result = json.loads((evaluated / "evaluation.json").read_text())
    assert cells == [v for row in result["confusion_matrix"]["matrix"] for v in row]
    worst = re.search(r'<section id="worst">(.*?)</section>', dom, re.S).group(1)
    thumbs = re.findall(r'<img class="thumb"[^>]*src="([^"]*)"', worst)
    assert len(thumbs) == 16 and all(src.startswith("data:image/png;base64,") for src in thumbs)
    assert re.search(r'<section id="roc-pr">.*?<img class="plot"', dom, re.S)
    # Errors first, each group by loss, highest first; the errors are the highest-loss ones of all errors.
    grid = worst[worst.index('<div class="grid">') :]
    tags = re.findall(r'<span class="tag( ok)?">', grid)
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", grid)]
    errors = [loss for tag, loss in zip(tags, losses) if not tag]
    assert tags == sorted(tags) and errors == sorted(errors, reverse=True)
    table = pq.read_table(evaluated / "predictions.parquet").to_pylist()
    wrong = [r for r in table if r["error"] is None and r["label"] != r["true_label"]]
    assert len(errors) == min(16, len(wrong))


def test_s3_folders_and_local_shards_in_s3_out(ray_session, s3, labelled_set, tiny_shards, run_dir):
    data = upload_tree(s3, labelled_set, "eval/faces")
    output = f"s3://{BUCKET}/eval/out"
    run(EvaluateConfig(data=(data, str(tiny_shards)), output=output, model=str(run_dir), batch_size=8))
    result = json.loads(storage.read_bytes(f"{output}/evaluation.json"))
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/predictions.parquet")))
    paths = table["path"].to_pylist()
    assert result["n"] == 40 + 24 and len(paths) == 41 + 24
    assert sum(p.startswith(f"{data}/") for p in paths) == 41 and sum("#" in p for p in paths) == 24
    shard_labels = {r["path"]: r["true_label"] for r in table.to_pylist() if "#" in r["path"]}
    assert set(shard_labels.values()) == {"happy", "sad"}
    assert b"id='confusion-matrix'" in storage.read_bytes(f"{output}/report.html")
    # A thumbnail's bytes: a file is read directly (the data set is not even listed), a shard member found in it.
    from happysad.report import fetch_images
    from happysad.sources import labelled_images, list_labelled

    member, file = next(iter(shard_labels)), next(p for p in paths if p.startswith(f"{data}/sad/"))
    assert list(fetch_images(lambda: pytest.fail("listed the data set for a file"), [file])) == [file]
    found = fetch_images(lambda: labelled_images(list_labelled([data, str(tiny_shards)])), [member, file])
    assert all(decode_image(found[p]).shape == (256, 256, 3) for p in (member, file))


def test_job_entry_point_with_a_threshold_override(ray_session, tiny_folders, run_dir, tmp_path):
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "jobs/evaluate.py", "--model", str(run_dir / "model.keras"), "--data", str(tiny_folders),
         "--output", str(output), "--threshold", "0.6", "--batch-size", "8"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    evaluation = json.loads((output / "evaluation.json").read_text())
    assert evaluation["threshold"] == 0.6 and evaluation["n"] == 24
    assert "evaluated 24 images at threshold 0.600" in result.stdout
    rows = pq.read_table(output / "predictions.parquet").to_pylist()
    assert all(r["label"] == ("sad" if r["score"] >= 0.6 else "happy") for r in rows)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--output", "OUT", "--model", "MODEL"], "--data"),
        (["--data", "DATA", "--model", "MODEL"], "--output"),
        (["--data", "/no/such/place", "--output", "OUT", "--model", "MODEL"], "--data /no/such/place"),
        (["--data", "DATA", "--output", "OUT", "--model", "MODEL", "--threshold", "2"], "--threshold"),
        (["--data", "DATA", "--output", "OUT", "--model", "CORRUPT"], "--model CORRUPT"),
        (["--data", "DATA", "--output", "OUT", "--model", "LAMBDA"], "layer 'Lambda' is not part of the happysad CNN"),
        (["--data", "DATA", "--output", "DONE", "--model", "MODEL"], "--output DONE: already holds an evaluation"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_nothing_run(args, named, run_dir, labelled_set, lambda_model, tmp_path):
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes((run_dir / "model.keras").read_bytes()[:5000])
    values = {
        "MODEL": str(run_dir), "CORRUPT": str(corrupt), "LAMBDA": str(lambda_model[0]),
        "DATA": str(labelled_set), "OUT": str(tmp_path / "out"), "DONE": str(tmp_path / "done"),
    }
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "evaluation.json").write_text("{}")  # an earlier evaluation: never written over
    started = time.monotonic()
    result = run_cli("evaluate", *[values.get(a, a) for a in args])
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert named.replace("CORRUPT", str(corrupt)).replace("DONE", str(tmp_path / "done")) in result.stderr
    assert time.monotonic() - started < 60  # refused in the driver, before any scoring
    assert not lambda_model[1].exists() and not (tmp_path / "out").exists()
