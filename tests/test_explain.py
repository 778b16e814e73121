"""Explain: the heat map sits on the face, one readable PNG per image, bad images and Lambda models refused."""

from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest

from conftest import run_cli
from happysad import synth
from happysad.decode import decode_image
from happysad.explain import grad_cam, output_names
from happysad.model import build_model, load_model

TRAIN_SEED, HELD_OUT_SEED = 40, 41


def face(seed: int, index: int) -> tuple[np.ndarray, str, tuple[float, float, float]]:
    """A synthetic face decoded to 256x256, its label, and its face disc (cx, cy, r) in that image's pixels.

    The disc is read off the drawing itself: synth draws the face as its largest circle (eyes are smaller).
    """
    circles, draw = [], cv2.circle

    def spy(image, centre, radius, *args, **kwargs):
        circles.append((centre, radius, image.shape[0]))
        return draw(image, centre, radius, *args, **kwargs)

    with mock.patch.object(synth.cv2, "circle", spy):
        s = synth.sample(seed, index)
    (cx, cy), radius, side = max(circles, key=lambda c: c[1])
    k = 256 / side  # decode_image stretches side x side to 256 x 256; pixel centres map as (x + 0.5) * k - 0.5
    return decode_image(s.data), s.label, ((cx + 0.5) * k - 0.5, (cy + 0.5) * k - 0.5, radius * k)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """The seed CNN after 3 epochs of a plain Keras fit on 384 synthetic faces (~30 s on 2 cores, ~0.9 held-out accuracy)."""
    import keras

    faces = [face(TRAIN_SEED, i) for i in range(384)]
    images = np.stack([f[0] for f in faces])
    labels = np.array([synth.CLASSES.index(f[1]) for f in faces], np.float32)
    keras.utils.set_random_seed(0)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.fit(images, labels, batch_size=32, epochs=3, verbose=0)
    path = tmp_path_factory.mktemp("trained") / "model.keras"
    model.save(path)
    return path


def test_heat_sits_on_the_face(trained_model):
    keras_model = load_model(str(trained_model))
    rows, cols = np.mgrid[:256, :256]
    inside, outside, correct = [], [], []
    for index in range(12):
        image, label, (cx, cy, r) = face(HELD_OUT_SEED, index)
        heat, score = grad_cam(keras_model, image)
        assert heat.shape == (256, 256) and heat.dtype == np.float32
        assert heat.min() >= 0 and heat.max() == pytest.approx(1)
        assert score == pytest.approx(float(keras_model.predict_on_batch(image[None])[0, 0]), abs=1e-5)
        disc = (cols - cx) ** 2 + (rows - cy) ** 2 <= r * r
        inside.append(heat[disc].mean())
        outside.append(heat[~disc].mean())
        correct.append((score >= 0.5) == (label == "sad"))
    assert np.mean(correct) >= 0.75, "the model did not learn: its heat maps would explain nothing"
    # Measured: trained models put 7-20x more mean heat inside the face than outside; an
    # untrained one ~1x. 3x keeps a wide margin while still telling the two apart.
    assert np.mean(inside) > 3 * np.mean(outside), (np.mean(inside), np.mean(outside))


def test_a_png_per_image_with_heat_and_score(trained_model, tmp_path):
    paths = []
    for index, name in enumerate(("a/face.jpg", "b/face.jpg", "other.png")):
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(synth.sample(HELD_OUT_SEED, index).data)
        paths.append(str(path))
    out = tmp_path / "heat"
    result = run_cli("explain", "--model", str(trained_model), *paths, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    keras_model = load_model(str(trained_model))
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == paths
    assert [Path(line[3]).name for line in lines] == ["face.png", "face-2.png", "other.png"]
    for (path, label, score, png), expected in zip(lines, output_names(tuple(paths))):
        picture = cv2.imread(str(out / expected))
        assert picture is not None and picture.shape[0] >= 256 and picture.shape[1] >= 256
        assert np.abs(picture[:256, :256].astype(int) - picture[:256, 256:512]).max() > 50  # the heat is drawn
        direct = float(keras_model.predict_on_batch(decode_image(Path(path).read_bytes())[None])[0, 0])
        assert float(score) == pytest.approx(direct, abs=1e-5)
        assert label == ("sad" if float(score) >= 0.5 else "happy")


def test_a_bad_image_exits_2_naming_it(trained_model, tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "notes.txt"
    good.write_bytes(synth.sample(HELD_OUT_SEED, 0).data)
    bad.write_text("just text")
    out = tmp_path / "heat"
    result = run_cli("explain", "--model", str(trained_model), str(good), str(bad), "--out", str(out))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(bad) in result.stderr and "not_an_image" in result.stderr
    assert not out.exists(), "images are checked before anything is written"


def test_a_missing_image_exits_2_naming_it(trained_model, tmp_path):
    result = run_cli("explain", "--model", str(trained_model), str(tmp_path / "gone.jpg"), "--out", str(tmp_path / "heat"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"{tmp_path / 'gone.jpg'}: no such file" in result.stderr


def test_a_lambda_model_is_refused_without_running_it(lambda_model, tmp_path):
    image = tmp_path / "face.jpg"
    image.write_bytes(synth.sample(HELD_OUT_SEED, 0).data)
    result = run_cli("explain", "--model", str(lambda_model[0]), str(image), "--out", str(tmp_path / "heat"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "layer 'Lambda' is not part of the happysad CNN" in result.stderr
    assert not lambda_model[1].exists()
    assert not (tmp_path / "heat").exists()
