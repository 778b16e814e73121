"""Export: the SavedModel and the TFLite file give the Keras model's scores; bad flags and Lambda models refused."""

from pathlib import Path

import numpy as np
import pytest

from conftest import BUCKET, run_cli
from happysad import synth
from happysad.decode import decode_image
from happysad.model import build_model, load_model


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """Six synthetic faces as the model takes them: (6, 256, 256, 3) uint8 RGB."""
    return np.stack([decode_image(synth.sample(51, i).data) for i in range(6)])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, faces) -> Path:
    """The seed CNN, untrained, its output layer scaled and centred on these faces so their scores
    spread across 0.5: an export that got preprocessing or weights wrong cannot hide among scores that are all alike."""
    import keras

    keras.utils.set_random_seed(0)
    model = build_model()
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel * 60, bias])
    scores = np.asarray(model.predict_on_batch(faces))[:, 0]
    model.layers[-1].set_weights([kernel * 60, bias - np.log(scores / (1 - scores)).mean()])
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def keras_scores(model_file, faces) -> np.ndarray:
    scores = np.asarray(load_model(str(model_file)).predict_on_batch(faces))[:, 0]
    assert np.ptp(scores) > 0.3, "scores too alike to tell a good export from a bad one"
    return scores


def test_savedmodel_gives_the_keras_scores(model_file, faces, keras_scores, tmp_path):
    import tensorflow as tf

    out = tmp_path / "serving" / "1"
    result = run_cli("export", "--model", str(model_file), "--format", "savedmodel", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = tf.saved_model.load(str(out))
    default = loaded.signatures["serving_default"]
    (spec,) = default.structured_input_signature[1].values()
    assert spec.dtype == tf.float32 and spec.shape.as_list() == [None, 256, 256, 3]
    as_float = default(images=tf.constant(faces.astype(np.float32)))["p_sad"].numpy()
    as_uint8 = loaded.signatures["serving_uint8"](images=tf.constant(faces))["p_sad"].numpy()
    np.testing.assert_allclose(as_float, keras_scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(as_uint8, keras_scores, atol=1e-5, rtol=0)
    assert not list(out.parent.glob(".happysad-export-*")), "no staging folder is left behind"


def test_tflite_gives_the_keras_scores(model_file, faces, keras_scores, tmp_path):
    import tensorflow as tf

    out = tmp_path / "happysad.tflite"
    result = run_cli("export", "--model", str(model_file), "--format", "tflite", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    runner = tf.lite.Interpreter(model_path=str(out)).get_signature_runner("serving_default")
    scores = np.concatenate([runner(images=face[None].astype(np.float32))["p_sad"] for face in faces])
    np.testing.assert_allclose(scores, keras_scores, atol=1e-4, rtol=0)
    batch = runner(images=faces.astype(np.float32))["p_sad"]  # the batch dimension is dynamic too
    np.testing.assert_allclose(batch, keras_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--format", "onnx", "--out", "OUT"], "argument --format: invalid choice: 'onnx'"),
        (["--format", "savedmodel", "--out", "EXISTING"], "already exists"),
        (["--format", "tflite", "--out", "EXISTING"], "is a folder"),
        (["--format", "tflite", "--out", "EXISTING_FILE"], "already exists; give a new file name"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(model_file, tmp_path, args, named):
    existing = tmp_path / "existing"
    existing.mkdir()
    (tmp_path / "existing.tflite").write_bytes(b"an earlier export")
    values = {"OUT": str(tmp_path / "out"), "EXISTING": str(existing), "EXISTING_FILE": str(tmp_path / "existing.tflite")}
    result = run_cli("export", "--model", str(model_file), *[values.get(a, a) for a in args])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert named in result.stderr
    assert not (tmp_path / "out").exists() and not list(existing.iterdir())
    assert (tmp_path / "existing.tflite").read_bytes() == b"an earlier export"


def test_a_lambda_model_is_refused_without_running_it(lambda_model, tmp_path):
    out = tmp_path / "serving"
    result = run_cli("export", "--model", str(lambda_model[0]), "--format", "savedmodel", "--out", str(out))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "layer 'Lambda' is not part of the happysad CNN" in result.stderr
    assert not lambda_model[1].exists()
    assert not out.exists()


def test_savedmodel_to_s3(s3_server, s3, model_file, faces, keras_scores, tmp_path):
    import tensorflow as tf

    out = f"s3://{BUCKET}/export/happysad/1"
    result = run_cli("export", "--model", str(model_file), "--out", out)  # savedmodel is the default format
    assert result.returncode == 0, result.stderr[-3000:]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="export/happysad/1/")["Contents"]]
    assert "export/happysad/1/saved_model.pb" in keys
    local = tmp_path / "downloaded"
    for key in keys:
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(BUCKET, key, str(local / key))
    serve = tf.saved_model.load(str(local / "export/happysad/1")).signatures["serving_default"]
    np.testing.assert_allclose(serve(images=tf.constant(faces.astype(np.float32)))["p_sad"].numpy(), keras_scores, atol=1e-5, rtol=0)
    again = run_cli("export", "--model", str(model_file), "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr
