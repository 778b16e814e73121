"""report.html: the pure page builder on hand-made arrays, and the page every training run writes."""

import json
import re

from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from happysad import synth
from happysad.decode import decode_image
from happysad.metrics import binary_metrics, curves
from happysad.render import integer_epochs, render
from happysad.score import load_keras_model
from happysad.train import TrainConfig, run


def fake_rows(k: int, wrong: int) -> list[dict]:
    png = cv2.imencode(".png", np.full((128, 256, 3), 90, np.uint8))[1].tobytes()
    return [
        {"path": f"/data/sad/f{i}.jpg", "score": 0.1, "label": "happy", "true_label": "sad", "loss": 2.3 - i / 10, "wrong": i < wrong, "png": png}
        for i in range(k)
    ]


def page_of(metrics: dict, worst: list[dict], history=None) -> str:
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    sad = np.array([False, False, True, True])
    html = render(
        "t", metrics, curves(scores, sad, metrics["threshold"]), worst, {"test": {"happy": 2, "sad": 2}},
        {"hidden": 3}, {"data": ["s3://b/x"], "versions": {"python": "3.11"}}, history,
    )
    return html.decode()


def test_page_is_self_contained_and_holds_every_section():
    metrics = binary_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]), 0.5)
    html = page_of(metrics, fake_rows(16, 16), history=[{"epoch": 1, "loss": 0.7, "accuracy": 0.5, "val_loss": None}])
    assert not re.search(r"(src|href)=['\"](?!data:)", html) and "<script" not in html  # nothing fetched
    for hook in ("metrics", "history", "confusion-matrix", "roc-pr", "counts", "skipped", "worst", "info"):
        assert f"id='{hook}'" in html, hook
    assert html.count("class='thumb'") == 16 and "The 16 worst errors" in html
    cells = re.findall(r"data-true='(\w+)' data-predicted='(\w+)'>(\d+)<", html)
    assert cells == [("happy", "happy", "2"), ("happy", "sad", "0"), ("sad", "happy", "1"), ("sad", "sad", "1")]
    assert "s3://b/x" in html and "hidden" in html


def test_undefined_metrics_show_na_with_the_reason_and_few_errors_are_labelled_so():
    metrics = binary_metrics(np.array([0.1, 0.2]), np.array([False, False]), 0.5)
    html = page_of(metrics, fake_rows(16, 3))
    for name in ("auc", "recall", "precision", "f1"):
        card = re.search(rf"data-metric='{name}'>(.*?)</div></div>", html).group(1)
        assert "n/a" in card and metrics["undefined"][name] in card
    assert "All 3 errors, then the highest-loss correct calls (16 images)" in html
    assert html.count("class='tag'>error") == 3 and html.count("class='tag ok'>correct") == 13 + 1  # +1: the note


def test_config_and_versions_read_as_tables_and_epochs_tick_in_whole_numbers():
    metrics = binary_metrics(np.array([0.1, 0.8]), np.array([False, True]), 0.5)
    info = {"config": {"learning_rate": 0.001, "data": ["s3://b/a", "s3://b/b"]}, "threshold": {"value": 0.46536, "reason": None}}
    html = render("t", metrics, {}, [], {}, {}, info).decode()
    section = re.search(r"<section id='info'>(.*?)</section>", html, re.S).group(1)
    assert "{" not in section and "<pre>" not in section  # no raw JSON
    assert "<th class='left'>learning_rate</th><td class='left'>0.001</td>" in section
    assert "s3://b/a<br>s3://b/b" in section and ">0.4654<" in section and "n/a" in section
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [0.7, 0.6])
    integer_epochs(ax)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    plt.close(fig)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_every_training_run_writes_a_report_of_its_test_split(ray_session, tmp_path):
    """40 faces, half of them test: the page shows the run's curves, counts and 16 thumbnails."""
    data = synth.make_data(tmp_path / "faces", n=40, seed=12)
    output = tmp_path / "run"
    metrics = run(TrainConfig(data=(str(data),), output=str(output), epochs=2, batch_size=8, val_fraction=0.2, test_fraction=0.5))
    html = (output / "report.html").read_text()
    for hook in ("history", "confusion-matrix", "roc-pr", "counts", "worst", "info"):
        assert f"id='{hook}'" in html, hook
    test_rows = sum(metrics["counts"]["test"].values())
    assert test_rows >= 16 and html.count("class='thumb'") == 16
    matrix = [int(v) for v in re.findall(r"data-predicted='\w+'>(\d+)<", html)]
    assert sum(matrix) == test_rows  # the whole test split, as the workers scored it
    rows = pq.read_table(output / "test_predictions.parquet").to_pylist()
    assert len(rows) == len({r["path"] for r in rows}) == test_rows and not list(output.glob(".test-*"))
    model = load_keras_model(str(output / "model.keras"))
    saved = model.predict(np.stack([decode_image(Path(r["path"]).read_bytes()) for r in rows]), verbose=0).reshape(-1)
    np.testing.assert_allclose([r["score"] for r in rows], saved, atol=1e-5)  # the saved model's scores
    assert [r["true_label"] for r in rows] == [Path(r["path"]).parent.name for r in rows]
    threshold = json.loads((output / "model.json").read_text())["threshold"]
    assert f"threshold {threshold:.3f}" in html
    for split in ("train", "val", "test"):
        assert f"<th class='left'>{split}</th>" in html
