"""What a person reads: each command run as a user runs it, stdout and stderr captured to pipes (not a terminal).

No TensorFlow, absl, oneDNN or CUDA start-up lines; no Ray `core_worker.cc` line about actor arguments
(ray-project/ray#53727); no terminal escape sequences; relayed worker lines as `worker 0:` / `replica:`;
a real warning still shown.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, run_cli

from happysad import console

# What TensorFlow's and absl's native code print at import and first device use on a machine without a GPU.
TENSORFLOW_LINES = (
    "oneDNN custom operations", "Could not find cuda drivers", "cpu_feature_guard", "absl::InitializeLog",
    "failed call to cuInit", "TF_ENABLE_ONEDNN_OPTS", "rebuild TensorFlow",
)
CORE_WORKER_LINE = "has constructor arguments in the object store"
RAY_PREFIXES = ("(RayTrainWorker", "(MapWorker", "pid=")


def log_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def assert_readable(result: subprocess.CompletedProcess) -> None:
    log = log_of(result)
    assert result.returncode == 0, log[-3000:]
    assert "\x1b" not in log, log[-3000:]
    for line in TENSORFLOW_LINES:
        assert line not in log, log[-3000:]
    assert CORE_WORKER_LINE not in log and "core_worker.cc" not in log, log[-3000:]
    for prefix in RAY_PREFIXES:
        assert prefix not in log, log[-3000:]


@pytest.fixture(scope="module")
def image(tiny_folders):
    return str(next((tiny_folders / "happy").iterdir()))


def test_score_log_is_plain_and_has_no_core_worker_line(ray_session, model_file, tiny_folders, tmp_path):
    result = run_cli("score", "--model", str(model_file), "--input", str(tiny_folders), "--output", str(tmp_path / "out"))
    print(log_of(result))
    assert_readable(result)
    assert any(line.startswith("replica: ") for line in result.stdout.splitlines()), result.stdout
    assert "scored 24 inputs" in result.stdout


def test_evaluate_log_is_plain_and_has_no_tensorflow_or_core_worker_line(ray_session, model_file, tiny_folders, tmp_path):
    result = run_cli("evaluate", "--model", str(model_file), "--data", str(tiny_folders), "--output", str(tmp_path / "eval"))
    print(log_of(result))
    assert_readable(result)
    assert "evaluated 24 images" in result.stdout


def test_train_log_is_plain_with_short_prefixes(ray_session, tiny_folders, tmp_path):
    args = ["train", "--data", str(tiny_folders), "--output", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8"]
    result = run_cli(*args)
    print(log_of(result))
    assert_readable(result)
    assert [line for line in result.stdout.splitlines() if line.startswith("worker 0: epoch 1/1 ")], result.stdout
    assert "Warning" not in log_of(result)  # Ray's own deprecation warnings stay off the console


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_predict_and_explain_print_no_tensorflow_lines(command, model_file, image, tmp_path):
    out = ["--out", str(tmp_path / "heat")] if command == "explain" else []
    result = run_cli(command, "--model", str(model_file), *out, image)
    assert_readable(result)
    assert result.stderr == "" and result.stdout.startswith(f"{image}\t"), log_of(result)


@pytest.mark.parametrize("fmt, name", [("savedmodel", "serving/1"), ("tflite", "happysad.tflite")])
def test_export_prints_only_where_the_export_is(fmt, name, model_file, tmp_path):
    out = tmp_path / name
    result = run_cli("export", "--model", str(model_file), "--format", fmt, "--out", str(out))
    assert_readable(result)
    assert result.stderr == "", result.stderr
    assert result.stdout.splitlines() == [f"exported {fmt} of model {result.stdout.split()[4]} to {out}"], result.stdout
    assert "Assets written to" not in log_of(result) and ".happysad-export-" not in log_of(result)
    assert out.exists() and not list(tmp_path.rglob(".happysad-export-*"))


def test_verbose_still_shows_tensorflow_lines(model_file, image):
    result = run_cli("predict", "--verbose", "--model", str(model_file), image)
    # Which native lines TensorFlow prints depends on the CPU (oneDNN's on some, AVX's on others): any of them
    native = [line for line in result.stderr.splitlines() if console._NATIVE_NOISE.match(line)]
    assert result.returncode == 0 and native, result.stderr[-3000:]


def test_a_warning_of_our_own_is_still_shown(model_file, image):
    """A UserWarning raised in happysad's code during the command, and what else is written to stderr while
    TensorFlow's import lines are held back, reach the console."""
    script = textwrap.dedent(
        f"""
        import os, sys, warnings
        from happysad import cli, console, score

        loaded = score.load_keras_model

        def load_keras_model(uri):
            warnings.warn("our own warning", UserWarning)
            with console.native_stderr_hidden():
                os.write(2, b"I0000 00:00:1796525054.685450   11162 port.cc:153] oneDNN custom operations are on.\\n")
                os.write(2, b"E0000 00:00:1796525054.685450   11162 real.cc:1] a real native error\\n")
                warnings.warn("a warning while held back", UserWarning)
            return loaded(uri)

        score.load_keras_model = load_keras_model
        sys.exit(cli.main(["predict", "--model", {str(model_file)!r}, {image!r}]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "UserWarning: our own warning" in result.stderr and "UserWarning: a warning while held back" in result.stderr
    assert "a real native error" in result.stderr and "oneDNN" not in result.stderr, result.stderr


def test_escape_sequences_are_dropped_off_a_terminal():
    script = "from happysad import console; console.plain_unless_terminal(); print('\\x1b[36m(x)\\x1b[0m plain\\x1b[2K')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0 and result.stdout == "(x) plain\n", repr(result.stdout)


def test_a_replica_passed_its_state_by_value_still_restarts(ray_session, tmp_path):
    """The cause of the core_worker line, fixed: Ray Data's actor pools get their DataContext and MapTransformer
    by value (console.join_ray). An actor whose process dies is started again from them, as before."""
    script = textwrap.dedent(
        """
        import os, sys
        import ray.data
        from happysad import console

        console.join_ray()
        marker = sys.argv[1]

        class DiesOnce:
            def __init__(self, tag):
                self.tag = tag

            def __call__(self, batch):
                if not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(1)  # the process dies: Ray restarts the actor, running __init__ again
                return batch | {"tag": [self.tag] * len(batch["id"])}

        rows = ray.data.range(8).map_batches(
            DiesOnce, fn_constructor_kwargs={"tag": "restarted"}, compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=4, num_cpus=1, max_restarts=1, max_task_retries=-1,
        ).take_all()
        print(len(rows), sorted({r["tag"] for r in rows}))
        """
    )
    marker = tmp_path / "died"
    result = subprocess.run([sys.executable, "-c", script, str(marker)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists() and result.stdout.splitlines()[-1] == "8 ['restarted']", result.stdout[-3000:]
    assert CORE_WORKER_LINE not in result.stderr, result.stderr[-3000:]
