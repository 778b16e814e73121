"""A scoring run's _report.html and _summary.json: built in one pass, rebuilt from the Parquet alone, shown by a browser
with every thumbnail decoded (files, tar and zip members, S3 objects); drift against the validation scores
that training keeps in model.json; the label loop from the borderline images to a training set's folders."""

import base64
import csv
import io
import json
import os
import re
import shutil
import tarfile
import urllib.parse
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from conftest import BUCKET, run_cli, upload_tree
from happysad import metrics, run_files, score_report, synth
from happysad.score_report import PAGE, SUMMARY
from happysad.score import ScoreConfig, run
from happysad.score_output import SCHEMA
from test_evaluate import browse, chromium

ODD_NAME = b"caf\xe9 #1%.jpg"  # Latin-1, with the two characters paths escape: read back by its raw bytes


# --- the numbers ---------------------------------------------------------------------------------------------------


def test_psi_and_ks_by_hand():
    a, b = np.array([10, 30]), np.array([20, 20])
    p, q = (b + 0.5) / 41, (a + 0.5) / 41  # each bin's count plus the pseudo-count
    assert metrics.psi(a, b) == pytest.approx(np.sum((p - q) * np.log(p / q)))
    assert metrics.psi(a, b) == pytest.approx(metrics.psi(b, a))  # symmetric
    assert metrics.psi(a, a) == 0 and metrics.ks_binned(a, 2 * a) == (0.0, 0)
    assert metrics.ks_binned(a, b) == (pytest.approx(0.25), 0)  # 10/40 below the first edge against 20/40
    assert metrics.drift(a, np.zeros(2, int))["psi"] is None  # nothing scored: undefined, with the reason
    # The rule of thumb's levels: PSI 0.0586, 0.1354 and 0.4149 by hand.
    for counts, level, value in (([620, 380], "stable", 0.0586), ([680, 320], "moderate", 0.1354), ([800, 200], "shifted", 0.4149)):
        found = metrics.drift([500, 500], counts)
        assert (found["psi_level"], round(found["psi"], 4)) == (level, value)


def test_binned_ks_is_the_exact_statistic_for_scores_at_bin_centres():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    centres = (np.arange(metrics.DRIFT_BINS) + 0.5) / metrics.DRIFT_BINS
    x, y = rng.choice(centres, 500), rng.choice(centres, 800, p=np.linspace(1, 3, metrics.DRIFT_BINS) / np.linspace(1, 3, metrics.DRIFT_BINS).sum())
    d, _ = metrics.ks_binned(metrics.score_histogram(x), metrics.score_histogram(y))
    exact = scipy_stats.ks_2samp(x, y)
    assert d == pytest.approx(exact.statistic)
    assert metrics.ks_p_value(d, 500, 800) == pytest.approx(scipy_stats.ks_2samp(x, y, method="asymp").pvalue, abs=0.02)


def test_score_histogram_bins_every_score_once():
    scores = np.array([0, 0.05, 0.0499999, 0.5, 0.999, 1.0, np.nan], np.float32)
    counts = metrics.score_histogram(scores)
    assert counts.sum() == 6 and counts[0] == 2 and counts[1] == 1 and counts[10] == 1 and counts[-1] == 2


def test_the_sheets_are_drawn_from_the_whole_run_whatever_the_file_order(tmp_path):
    """10,000 rows tied at score 1.0 in 5 files: the 24 shown are spread over the files, not the first rows, and the
    same 24 whatever order the files are read in; the pass holds 24 rows per sheet."""
    paths = [f"/data/{i:05d}.jpg" for i in range(10_000)]

    def write(folder: Path, order: list[int]):
        folder.mkdir()
        for part, start in enumerate(order):
            chunk = paths[start * 2000 : (start + 1) * 2000]
            n = len(chunk)
            table = pa.table(
                {"path": chunk, "score": pa.array(np.ones(n, np.float32)), "label": ["sad"] * n, "error": pa.nulls(n, pa.string()),
                 "model": ["m"] * n, "error_detail": pa.nulls(n, pa.string())}, schema=SCHEMA,
            )
            pq.write_table(table, folder / f"part-{part}.parquet")

    write(tmp_path / "a", [0, 1, 2, 3, 4])
    write(tmp_path / "b", [4, 3, 2, 1, 0])
    chosen = [score_report.one_pass(str(tmp_path / x), 0.5, {"sad": (score_report.SHEETS["sad"], 24)}).selections["sad"].paths for x in "ab"]
    assert chosen[0] == chosen[1] and len(chosen[0]) == 24
    assert len({int(p[6:11]) // 2000 for p in chosen[0]}) == 5  # every file contributes


# --- make-data --background ---------------------------------------------------------------------------------------


def test_make_data_background_draws_the_same_faces_on_dark_or_light(tmp_path):
    result = run_cli("make-data", "--out", str(tmp_path / "dark"), "--n", "4", "--seed", "3", "--background", "dark")
    assert result.returncode == 0, result.stderr
    for i in range(4):
        plain, dark, light = (synth.sample(3, i, kind) for kind in ("any", "dark", "light"))
        corners = [cv2.imdecode(np.frombuffer(s.data, np.uint8), cv2.IMREAD_COLOR)[:8, :8].mean() for s in (plain, dark, light)]
        assert corners[1] < 45 and corners[2] > 210 and (plain.key, plain.extension) == (dark.key, dark.extension)
        assert (tmp_path / "dark" / dark.label / f"{dark.key}.{dark.extension}").read_bytes() == dark.data
    assert synth.sample(3, 0).data == synth.sample(3, 0, "any").data  # the default set is unchanged
    bad = run_cli("make-data", "--out", str(tmp_path / "x"), "--n", "1", "--background", "grey")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


# --- a real run: train keeps the val histogram, score writes the page ---------------------------------------------


@pytest.fixture(scope="module")
def trained_run(ray_session, tiny_folders, tmp_path_factory) -> Path:
    from happysad.train import TrainConfig
    from happysad.train import run as train

    output = tmp_path_factory.mktemp("trained") / "run"
    train(TrainConfig(data=(str(tiny_folders),), output=str(output), epochs=1, batch_size=8))
    return output


def test_training_keeps_the_validation_score_histogram_in_model_json(trained_run):
    info = json.loads((trained_run / "model.json").read_text())
    val = pq.read_table(trained_run / "val_predictions.parquet")
    kept = info["val_histogram"]
    assert kept["counts"] == metrics.score_histogram(val["score"].to_numpy()).tolist()
    assert kept["n"] == val.num_rows > 0 and kept["bins"] == metrics.DRIFT_BINS and kept["range"] == [0.0, 1.0]


@pytest.fixture(scope="module")
def inputs(s3, tmp_path_factory) -> dict:
    """Local faces (one with an odd name, one broken), a tar and a zip of faces (member names with `#` and `%`),
    faces under an S3 prefix: 22 images, so every one of them is on the happy or the sad sheet."""
    root = tmp_path_factory.mktemp("report-inputs")
    faces = synth.make_data(root / "faces", n=10, seed=41)
    (faces / "happy" / "broken.jpg").write_bytes(b"not a picture")
    odd = synth.sample(41, 10)
    with open(bytes(faces) + b"/" + ODD_NAME, "wb") as f:
        f.write(odd.data)
    members = {f"in/{i}#{synth.sample(42, i).key}%.{synth.sample(42, i).extension}": synth.sample(42, i).data for i in range(4)}
    with tarfile.open(root / "batch.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    zipped = {f"z{i}.{synth.sample(43, i).extension}": synth.sample(43, i).data for i in range(3)}
    with zipfile.ZipFile(root / "batch.zip", "w") as archive:
        for name, data in zipped.items():
            archive.writestr(name, data)
    s3_faces = synth.make_data(root / "s3faces", n=4, seed=44)
    prefix = upload_tree(s3, s3_faces, "report-inputs")
    return {"faces": faces, "tar": root / "batch.tar", "zip": root / "batch.zip", "s3": prefix, "members": members, "zipped": zipped}


@pytest.fixture(scope="module")
def scored(ray_session, trained_run, inputs, tmp_path_factory) -> dict:
    """One output, scored twice: the local faces, then extended by the tar, the zip and the S3 prefix."""
    output = tmp_path_factory.mktemp("scored") / "out"
    first = run(ScoreConfig(inputs=(str(inputs["faces"]),), output=str(output), model=str(trained_run), batch_size=8))
    first_summary = json.loads((output / SUMMARY).read_text())
    second = run(
        ScoreConfig(inputs=(str(inputs["faces"]), str(inputs["tar"]), str(inputs["zip"]), inputs["s3"]), output=str(output),
                    model=str(trained_run), batch_size=8)
    )
    return {"output": output, "first": first, "first_summary": first_summary, "second": second}


def parquet_rows(output: Path) -> list[dict]:
    return pa.concat_tables(pq.read_table(p) for p in sorted(output.glob("*.parquet"))).to_pylist()


def test_score_writes_summary_and_page_and_an_extended_run_updates_them(scored):
    output = scored["output"]
    rows = parquet_rows(output)
    summary = json.loads((output / SUMMARY).read_text())
    assert scored["first_summary"]["rows"] == 12 and summary["rows"] == len(rows) == 12 + 4 + 3 + 4
    labels = [r["label"] for r in rows]
    assert summary["labels"] == {"happy": labels.count("happy"), "sad": labels.count("sad")}
    assert summary["errors"] == {"not_an_image": 1} and summary["error_examples"]["not_an_image"][0].endswith("/happy/broken.jpg")
    assert summary["scored"] == sum(summary["histogram"]["counts"]) == len(rows) - 1
    record = json.loads((output / "_scoring.json").read_text())
    assert summary["model"] == {"id": record["model"], "uri": record["model_uri"], "threshold": record["threshold"]}
    # Drift against the trained run's validation histogram: the same figures as metrics.drift on the rows' scores.
    reference = json.loads((Path(record["model_uri"]).parent / "model.json").read_text())["val_histogram"]["counts"]
    expected = metrics.drift(reference, metrics.score_histogram([r["score"] for r in rows if r["score"] is not None]))
    assert summary["drift"] == json.loads(json.dumps(expected | {"reference_model": record["model_uri"]}))
    assert scored["second"]["drift"] == summary["drift"]
    page = (output / PAGE).read_text()
    assert f"{summary['rows']} rows in" in page and "Not measured" not in page
    # `_`-named beside the Parquet: the folder still reads as a Parquet dataset, as the docs promise.
    assert pads.dataset(str(output), format="parquet").count_rows() == summary["rows"]


def test_report_rebuilds_page_and_summary_identically_from_the_parquet_alone(scored, model_file, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(scored["output"], copy)
    # The same rows elsewhere: its page names its own folder. Rebuilt twice from the Parquet alone: the same bytes.
    for name in (SUMMARY, PAGE):
        (copy / name).unlink()
    first = run_cli("report", "--scores", str(copy))
    assert first.returncode == 0, first.stderr
    made = {name: (copy / name).read_bytes() for name in (SUMMARY, PAGE)}
    for name in made:
        (copy / name).unlink()
    again = run_cli("report", "--scores", str(copy))
    assert again.returncode == 0 and {name: (copy / name).read_bytes() for name in made} == made
    # In place, it gives what score wrote.
    original = {name: (scored["output"] / name).read_bytes() for name in made}
    for name in made:
        (scored["output"] / name).unlink()
    in_place = run_cli("report", "--scores", str(scored["output"]))
    assert in_place.returncode == 0 and {name: (scored["output"] / name).read_bytes() for name in made} == original
    # Another reference: a model trained before model.json kept the val histogram. Drift is skipped, with why.
    old = tmp_path / "old-run"
    old.mkdir()
    shutil.copy(model_file, old / "model.keras")
    (old / "model.json").write_text(json.dumps({"threshold": 0.5, "classes": ["happy", "sad"], "image_size": 256}))
    skipped = run_cli("report", "--scores", str(copy), "--model", str(old))
    summary = json.loads((copy / SUMMARY).read_text())
    assert skipped.returncode == 0 and summary["drift"]["psi"] is None and "val_histogram" in summary["drift"]["reason"]
    assert "Not measured" in (copy / PAGE).read_text() and "not measured" in skipped.stdout
    for args in (["report"], ["report", "--scores", str(tmp_path / "nothing")], ["report", "--scores", str(copy), "--model", str(tmp_path / "x")]):
        bad = run_cli(*args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, (args, bad.stderr)


def probe(page: Path, folder: Path) -> Path:
    """A copy of the page with a script that records, after load, each image's decoded size and any error or
    console message (the page itself has no script): what a person's browser made of it, read from the DOM."""
    script = """<script>
const errors = [];
for (const kind of ['error', 'warn']) { const f = console[kind]; console[kind] = (...a) => { errors.push(a.join(' ')); f(...a); }; }
window.addEventListener('error', e => errors.push('error ' + (e.target && e.target.src ? e.target.src.slice(0, 40) : e.message)), true);
window.addEventListener('load', () => {
  for (const img of document.images) img.setAttribute('data-decoded', img.naturalWidth + 'x' + img.naturalHeight);
  document.body.setAttribute('data-errors', JSON.stringify(errors));
});
</script>"""
    copy = folder / "probed.html"
    copy.write_text(page.read_text().replace("<main>", script + "<main>", 1))
    return copy


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed and could not be (.ci/run installs it from Debian)")
def test_page_shows_in_a_browser_with_every_thumbnail_decoded(scored, inputs, tmp_path):
    page = scored["output"] / PAGE
    html = page.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert not re.findall(r"src='(?!data:)", html)  # every image inline
    screenshot = tmp_path / "page.png"
    dom = browse(probe(page, tmp_path), screenshot)
    pixels = cv2.imread(str(screenshot))
    assert pixels is not None and pixels.shape[:2] == (2400, 1200) and pixels.std() > 20
    assert re.search(r'<body data-errors="\[\]"', dom), re.search(r"<body[^>]*>", dom).group(0)
    summary = json.loads((scored["output"] / SUMMARY).read_text())
    for key in ("rows", "happy", "sad", "errors"):
        value = summary["rows"] if key == "rows" else summary["labels"].get(key, sum(summary["errors"].values()))
        assert re.search(rf'data-count="{key}"><div class="name">[^<]*</div><div class="value">{value}<', dom), key
    assert re.search(r'<tr data-reason="not_an_image">.*?broken\.jpg', dom)
    assert re.search(r'<section id="histogram"><h2>Scores</h2><svg class="histogram"', dom) and "threshold " in dom
    assert re.search(r'<section id="drift" data-psi="[0-9.]+" data-ks="[0-9.]+">', dom)
    shown = {}
    for sheet in ("sad", "happy", "borderline"):
        section = re.search(rf'<section id="sheet-{sheet}">(.*?)</section>', dom, re.S).group(1)
        items = re.findall(r'<figure class="sheet-item" data-score="([0-9.]+)"><img class="thumb"[^>]*src="data:image/jpeg;base64,([^"]+)" data-decoded="(\d+)x(\d+)">.*?title="([^"]+)"', section, re.S)
        assert len(items) == section.count('class="sheet-item"') <= 24 and "not shown" not in section
        for score, b64, width, height, path in items:
            assert (width, height) == ("128", "128")  # decoded by the browser
            assert cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR).shape == (128, 128, 3)
            shown[path.replace("&amp;", "&")] = float(score)
        scores = [float(s) for s, *_ in items]
        if sheet == "sad":
            assert scores == sorted(scores, reverse=True)
        elif sheet == "happy":
            assert scores == sorted(scores)
        else:
            threshold = summary["model"]["threshold"]
            assert [abs(s - threshold) for s in scores] == sorted(abs(s - threshold) for s in scores)
            assert len(items) == min(24, summary["scored"])
    rows = {r["path"]: r["score"] for r in parquet_rows(scored["output"]) if r["score"] is not None}
    assert set(shown) == set(rows)  # 22 scored images: every one is on the happy or the sad sheet, each read back
    assert any("%E9%20%231%25.jpg" in p or "%E9 %231%25.jpg" in p for p in shown)  # the odd local name, by its raw bytes
    assert sum(".tar#" in p for p in shown) == 4 and sum(".zip#" in p for p in shown) == 3 and sum(p.startswith("s3://") for p in shown) == 4


# --- drift: ~0 on the validation split itself, large on a shifted set ----------------------------------------------


def test_drift_is_zero_on_the_validation_images_and_large_on_dark_faces(ray_session, tmp_path):
    import keras

    from happysad.decode import decode_image
    from happysad.model import CLASSES, build_model

    keras.utils.set_random_seed(1)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    train = [synth.sample(40, i) for i in range(64)]
    model.fit(np.stack([decode_image(s.data) for s in train]), np.array([s.label == "sad" for s in train], np.float32),
              epochs=4, batch_size=16, verbose=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model.save(run_dir / "model.keras")
    # The validation split: 160 faces; its scores' histogram kept in model.json as training keeps it.
    val = synth.make_data(tmp_path / "val", n=160, seed=31)
    val_files = sorted(val.glob("*/*"))
    val_scores = model.predict(np.stack([decode_image(p.read_bytes()) for p in val_files]), batch_size=32, verbose=0)[:, 0]
    (run_dir / "model.json").write_bytes(run_files.model_json(0.5, CLASSES, 256, metrics.score_histogram(val_scores)))
    same = run(ScoreConfig(inputs=(str(val),), output=str(tmp_path / "out-val"), model=str(run_dir), batch_size=16))["drift"]
    assert same["n"] == same["reference_n"] == 160
    assert same["psi"] < 0.01 and same["ks"] < 0.02 and same["psi_level"] == "stable" and same["ks_p_value"] > 0.5
    dark_faces = synth.make_data(tmp_path / "dark", n=160, seed=32, background="dark")
    dark = run(ScoreConfig(inputs=(str(dark_faces),), output=str(tmp_path / "out-dark"), model=str(run_dir), batch_size=16))["drift"]
    assert dark["psi"] >= metrics.PSI_SHIFTED and dark["psi_level"] == "shifted" and dark["psi"] > 4 * dark["psi_by_chance"]
    assert dark["ks"] > dark["ks_critical_05"] and dark["ks_p_value"] < 0.001
    page = (tmp_path / "out-dark" / PAGE).read_text()
    assert "shifted" in page and "Siddiqi" in page


# --- the label loop ------------------------------------------------------------------------------------------------


def original_bytes(path: str, inputs: dict) -> bytes:
    """An image's bytes as the test made them, found without happysad's read-back."""
    if "#" in path:
        archive, member = path.split("#", 1)
        return (inputs["members"] if archive.endswith(".tar") else inputs["zipped"])[urllib.parse.unquote(member)]
    with open(urllib.parse.unquote_to_bytes(path), "rb") as f:
        return f.read()


def test_label_loop_copies_borderline_images_out_and_labelled_ones_into_a_training_set(scored, inputs, tmp_path):
    out, data = tmp_path / "to-label", tmp_path / "data"
    result = run_cli("label", "--scores", str(scored["output"]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((scored["output"] / SUMMARY).read_text())
    assert len(rows) == min(48, summary["scored"]) and {r["label"] for r in rows} == {""}
    assert sorted(float(r["score"]) for r in rows) == [float(r["score"]) for r in rows]
    local_rows = [r for r in rows if not r["path"].startswith("s3://")]
    assert any(".tar#" in r["path"] for r in local_rows) and any(".zip#" in r["path"] for r in local_rows)
    for r in local_rows:  # a copy, byte for byte; the original is still where it was
        assert (out / r["file"]).read_bytes() == original_bytes(r["path"], inputs)
    assert all(os.path.exists(urllib.parse.unquote_to_bytes(r["path"])) for r in local_rows if "#" not in r["path"])
    # A person labels them: by the class in the name, one left empty; then --apply copies them into DATA/happy|sad.
    for r in rows:
        name = r["path"].rsplit("/", 1)[-1]
        r["label"] = "happy" if "happy_" in name else "sad" if "sad_" in name else ""
    labelled = [r for r in rows if r["label"]]
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    applied = run_cli("label", "--apply", str(out / "labels.csv"), "--into", str(data))
    assert applied.returncode == 0, applied.stderr
    for r in labelled:
        assert (data / r["label"] / Path(r["file"]).name).read_bytes() == (out / r["file"]).read_bytes()
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()) == sorted(
        f"{r['label']}/{Path(r['file']).name}" for r in labelled
    )
    assert all((out / r["file"]).exists() for r in rows)  # copied, never moved
    again = run_cli("label", "--apply", str(out / "labels.csv"), "--into", str(data))
    assert again.returncode == 0 and f"{len(labelled)} already there" in again.stdout
    # A band, a limit; and mistakes: one line, exit 2, nothing copied.
    band = run_cli("label", "--scores", str(scored["output"]), "--out", str(tmp_path / "band"), "--band", "0:1", "--limit", "5")
    with open(tmp_path / "band" / "labels.csv", newline="") as f:
        assert band.returncode == 0 and len(list(csv.DictReader(f))) == 5
    typo = out / "typo.csv"
    typo.write_text("path,score,label,file\n" + f"{rows[0]['path']},{rows[0]['score']},hapy,{rows[0]['file']}\n")
    for args in (
        ["label", "--apply", str(typo), "--into", str(tmp_path / "data2")],
        ["label", "--scores", str(scored["output"]), "--out", str(out)],  # a labelling round is already there
        ["label", "--scores", str(scored["output"]), "--out", str(tmp_path / "b2"), "--band", "0.6:0.2"],
        ["label", "--apply", str(out / "labels.csv")],
        ["label", "--apply", str(out / "labels.csv"), "--into", str(data), "--band", "0:1"],
        ["label", "--out", str(tmp_path / "b3")],
    ):
        bad = run_cli(*args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, (args, bad.stderr)
    assert not (tmp_path / "data2").exists() and not (tmp_path / "b2").exists()
